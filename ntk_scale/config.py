"""`ntk-scale fit CONFIG.toml`: the run configuration, validated before anything runs.

Relative paths are resolved against the config file's directory and may not leave it; URLs
(s3://, gs://, memory://) are taken as they are. Unknown sections or keys are errors.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from typing import Any

from ntk_scale.io import load_kernel_spec
from ntk_scale.kernels import FullyConnected, Layer, Network
from ntk_scale.kernels.stax import PRESETS
from ntk_scale.options import GramOptions, RunOptions, SolveOptions

_SECTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "data": {
        "x_train": str,
        "y_train": str,
        "x_test": str,
        "y_test": str,
        # or a table (CSV / Parquet files) ingested first: see ntk_scale.ingest
        "table": str,
        "test_table": str,
        "features": list,
        "target": str,
        "categorical": list,
        "fill": str,
        "test_fraction": (int, float),
        "train_rows": int,
        "test_rows": int,
        "seed": int,
        "standardize_target": bool,
    },
    "kernel": {
        "depth": int,
        "activation": str,
        "W_std": (int, float),
        "b_std": (int, float),
        "negative_slope": (int, float),
        "kind": str,
        "preset": str,
        "spec": str,
    },
    "store": {"path": str, "tile": int, "dtype": str, "overwrite": bool},
    "solver": {
        "ridge": (int, float, list),
        "ridge_absolute": bool,
        "cv": int,
        "holdout": (int, float),
        "preconditioner": str,
        "rank": int,
        "tol": (int, float),
        "max_iter": int,
        "operator": str,
        "checkpoint_every": int,
        "seed": int,
        "pivot_block": int,
        "memory_budget_bytes": int,
    },
    "run": {
        "workers": int,
        "address": str,
        "threads_per_worker": int,
        "placement_timeout_s": (int, float),
        "accelerator": str,
        "allow_cpu": bool,
        "gpu_wait_s": (int, float),
    },
    "output": {"dir": str, "task": str},
}
_REQUIRED = {"store": ("path",), "output": ("dir",)}
#: The [data] keys that are paths (resolved against the config's directory).
_DATA_PATHS = ("x_train", "y_train", "x_test", "y_test", "table", "test_table")
TASKS = ("regression", "classification")


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """A validated config: paths absolute (or URLs), each stage's options as its frozen record
    (defaults from :mod:`ntk_scale.options`)."""

    source: str
    data: dict[str, str]
    kernel: FullyConnected | Layer | Network
    store: str
    gram: GramOptions
    solver: SolveOptions
    run: RunOptions
    output: dict[str, str]
    #: [data] as a table to ingest first (IngestOptions), or None for array files.
    table: Any = None


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
    data = {k: resolve_path(base, v, f"data.{k}") if k in _DATA_PATHS else v
            for k, v in raw.get("data", {}).items()}  # fmt: skip
    table = _table(path, data)
    kern = dict(raw.get("kernel", {}))
    store = dict(raw["store"])
    output = {"task": "regression", **raw["output"]}
    output["dir"] = resolve_path(base, output["dir"], "output.dir")
    if output["task"] not in TASKS:
        raise ValueError(f"{path}: output.task={output['task']!r}; use one of {TASKS}")
    run = {k: v for k, v in raw.get("run", {}).items() if v != ""}  # address = "": the default
    _section(path, "kernel", GramOptions, _kind(kern))  # kernel.kind named as such in errors
    return FitConfig(
        source=path,
        data=data,
        kernel=_kernel(path, base, _without(kern, "kind")),
        store=resolve_path(base, store.pop("path"), "store.path"),
        gram=_section(path, "store", GramOptions, {**store, **_kind(kern)}),
        solver=_section(path, "solver", SolveOptions, dict(raw.get("solver", {}))),
        run=_section(path, "run", RunOptions, run),
        output=output,
        table=table,
    )


def _table(path: str, data: dict[str, Any]) -> Any:
    """[data] as a table to ingest (IngestOptions), or None for x_train / y_train arrays."""
    arrays = [k for k in ("x_train", "y_train", "x_test", "y_test") if k in data]
    if "table" not in data:
        missing = [k for k in ("x_train", "y_train") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing required key data.{missing[0]} (or data.table = "
                             "\"files.parquet\" with data.features and data.target)")  # fmt: skip
        extra = sorted(set(data) - set(arrays))
        if extra:
            raise ValueError(f"{path}: data.{extra[0]} applies to a table; add data.table")
        return None
    if arrays:
        raise ValueError(f"{path}: data.table and data.{arrays[0]} both name the training "
                         "data; use one")  # fmt: skip
    for key in ("features", "target"):
        if key not in data:
            raise ValueError(f"{path}: data.table needs data.{key}")
    from ntk_scale.ingest import IngestOptions

    names = {"test_table": "test_source"}
    values = {names.get(k, k): v for k, v in data.items() if k != "table"}
    for key in ("features", "categorical"):
        if key in values:
            values[key] = tuple(values[key])
    try:
        return IngestOptions(**values, overwrite=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: [data] {err}") from None


def _kernel(path: str, base: str, kern: dict[str, Any]) -> Any:
    """[kernel]: FullyConnected fields, or ``preset = "myrtle5"``, or ``spec = "spec.json"``
    (a file written by ``spec.to_json()``, relative to the config)."""
    named = [k for k in ("preset", "spec") if k in kern]
    if not named:
        return _section(path, "kernel", FullyConnected, kern)
    if len(kern) > 1:
        raise ValueError(f"{path}: [kernel] {named[0]} = ... names the whole kernel; drop the "
                         f"other keys {sorted(set(kern) - {named[0]})}")  # fmt: skip
    if named[0] == "preset":
        if kern["preset"] not in PRESETS:
            raise ValueError(f"{path}: [kernel] preset={kern['preset']!r}; use one of "
                             f"{sorted(PRESETS)} (or FullyConnected fields)")  # fmt: skip
        return PRESETS[kern["preset"]]()
    return load_kernel_spec(resolve_path(base, kern["spec"], "kernel.spec"))


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def _kind(kern: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kern["kind"]} if "kind" in kern else {}


def _section(path: str, name: str, record: type, values: dict[str, Any]) -> Any:
    """record(**values), its ValueError prefixed with the file and section."""
    try:
        return record(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: [{name}] {err}") from None


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


def run_config(cfg: FitConfig) -> dict[str, Any]:
    """All stages from a validated config (through :func:`ntk_scale.stages.fit`). Writes
    OUT/model, OUT/predictions.npy (with x_test) and OUT/metrics.json; returns the metrics."""
    import numpy as np

    from ntk_scale import stages
    from ntk_scale.io import load_array, load_targets

    d, task, out = cfg.data, cfg.output["task"], cfg.output["dir"]
    classify = task == "classification"
    transform = None
    if cfg.table is not None:
        x_train, y_train, x_test, y_test, transform = _ingested(cfg, task, out)
    else:
        x_test = load_array(d["x_test"]) if "x_test" in d else None
        y_test = np.asarray(load_array(d["y_test"])) if "y_test" in d else None
        y_train = np.asarray(load_array(d["y_train"])) if classify else load_targets(d["y_train"])
        x_train = load_array(d["x_train"])
    inputs = stages.prepare_inputs(x_train, y_train, x_test, y_test, task)
    report = stages.fit(
        inputs, cfg.kernel, cfg.store, cfg.gram, cfg.solver, cfg.run,
        model_dir=f"{out}/model", extra={"task": task}, transform=transform,
    )  # fmt: skip
    result: dict[str, Any] = {
        "gram": report.gram.summary(),
        "solver": report.solve.meta["solver"],
        "timings": {f"{k}_s": v for k, v in report.seconds.items()},
        "plots": report.solve.meta.get("plots", []),
    }
    if report.predictions is not None:
        pred = report.predictions
        labels = pred if inputs.classes is None else inputs.classes[np.argmax(pred, axis=1)]
        stages.write_npy(f"{out}/predictions.npy", labels)
        if classify:
            stages.write_npy(f"{out}/decision_values.npy", pred)
    if report.test is not None:
        result["test"] = report.test
    stages.write_json(f"{out}/metrics.json", result)
    return result


def _ingested(cfg: FitConfig, task: str, out: str) -> tuple:
    """[data] table ingested into OUT/data: (x_train, y_train, x_test, y_test, transform)."""
    import numpy as np

    from ntk_scale.ingest import ingest, load_split

    if task != "regression":
        raise ValueError(
            f"{cfg.source}: data.table supports regression targets; set output.task = "
            '"regression" or give x_train / y_train arrays'
        )
    report = ingest(cfg.data["table"], f"{out}/data", cfg.table, address=cfg.run.address,
                    progress=cfg.run.show_progress)  # fmt: skip
    print(report.summary())
    x_train, y_train = load_split(f"{out}/data", "train")
    x_test = y_test = None
    if "test" in report.rows:
        x_test, y_test = load_split(f"{out}/data", "test")
        y_test = np.asarray(y_test[...])
    return x_train, np.asarray(y_train[...]), x_test, y_test, report.transform
