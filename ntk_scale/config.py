"""`ntk-scale fit CONFIG.toml`: the run configuration, validated before anything runs.

Relative paths are resolved against the config file's directory and may not leave it; URLs
(s3://, gs://, memory://) are taken as they are. Unknown sections or keys are errors.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from typing import Any

from ntk_scale.kernels import FullyConnected

_SECTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "data": {"x_train": str, "y_train": str, "x_test": str, "y_test": str},
    "kernel": {
        "depth": int,
        "activation": str,
        "W_std": (int, float),
        "b_std": (int, float),
        "negative_slope": (int, float),
        "kind": str,
    },
    "store": {"path": str, "tile": int, "dtype": str, "overwrite": bool},
    "solver": {
        "ridge": (int, float),
        "ridge_absolute": bool,
        "preconditioner": str,
        "rank": int,
        "tol": (int, float),
        "max_iter": int,
        "operator": str,
        "checkpoint_every": int,
        "seed": int,
    },
    "run": {"workers": int, "address": str},
    "output": {"dir": str, "task": str},
}
_REQUIRED = {"data": ("x_train", "y_train"), "store": ("path",), "output": ("dir",)}
TASKS = ("regression", "classification")


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """A validated config: paths absolute (or URLs), sections as plain dicts."""

    source: str
    data: dict[str, str]
    kernel: FullyConnected
    kind: str
    store: dict[str, Any]
    solver: dict[str, Any]
    run: dict[str, Any]
    output: dict[str, str]


def load_config(path: str) -> FitConfig:
    """Parse and validate CONFIG.toml; every error names the key and the fix."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML ({err})") from None
    _check_keys(path, raw)
    base = os.path.dirname(os.path.abspath(path))
    data = {k: resolve_path(base, v, f"data.{k}") for k, v in raw["data"].items()}
    kern = dict(raw.get("kernel", {}))
    kind = kern.pop("kind", "ntk")
    if kind not in ("ntk", "nngp"):
        raise ValueError(f"{path}: kernel.kind={kind!r}; use 'ntk' or 'nngp'")
    store = {"tile": 2048, "dtype": "float32", "overwrite": False, **raw["store"]}
    store["path"] = resolve_path(base, store["path"], "store.path")
    output = {"task": "regression", **raw["output"]}
    output["dir"] = resolve_path(base, output["dir"], "output.dir")
    if output["task"] not in TASKS:
        raise ValueError(f"{path}: output.task={output['task']!r}; use one of {TASKS}")
    try:
        spec = FullyConnected(**kern)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: [kernel] {err}") from None
    return FitConfig(
        path,
        data,
        spec,
        kind,
        store,
        dict(raw.get("solver", {})),
        dict(raw.get("run", {})),
        output,
    )


def _check_keys(path: str, raw: dict[str, Any]) -> None:
    for section, body in raw.items():
        if section not in _SECTIONS:
            raise ValueError(
                f"{path}: unknown section [{section}]; valid sections: {sorted(_SECTIONS)}"
            )
        if not isinstance(body, dict):
            raise ValueError(f"{path}: {section} must be a [section] table")
        for key, value in body.items():
            kinds = _SECTIONS[section].get(key)
            if kinds is None:
                raise ValueError(
                    f"{path}: unknown key {section}.{key}; valid keys: {sorted(_SECTIONS[section])}"
                )
            if isinstance(value, bool) and kinds is not bool:
                kinds = ()
            if not isinstance(value, kinds):
                raise ValueError(f"{path}: {section}.{key}={value!r} has the wrong type")
    for section, keys in _REQUIRED.items():
        for key in keys:
            if key not in raw.get(section, {}):
                raise ValueError(f"{path}: missing required key {section}.{key}")


def resolve_path(base: str, value: str, name: str) -> str:
    """An absolute path inside ``base`` (or a URL as it is); refuses paths that escape base."""
    if "://" in value:
        return value
    if os.path.isabs(value):
        raise ValueError(
            f"{name}={value!r}: use a path relative to the config's directory ({base}) or a URL"
        )
    full = os.path.realpath(os.path.join(base, value))
    if os.path.commonpath([full, os.path.realpath(base)]) != os.path.realpath(base):
        raise ValueError(
            f"{name}={value!r} escapes the config's directory {base}; keep data and outputs "
            "inside it (or use a URL)"
        )
    return full
