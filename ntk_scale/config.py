"""`ntk-scale fit CONFIG.toml`: the run configuration, validated before anything runs.

Relative paths are resolved against the config file's directory and may not leave it; URLs
(s3://, gs://, memory://) are taken as they are. Unknown sections or keys are errors.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from typing import Any

from ntk_scale import stages
from ntk_scale.ingest import IngestOptions, ingest, load_split
from ntk_scale.io import load_array, load_kernel_spec, load_targets
from ntk_scale.kernels import FullyConnected, Layer, Network
from ntk_scale.kernels.stax import PRESETS
from ntk_scale.options import (
    GramOptions,
    RunOptions,
    SolveOptions,
    check_choices,
    check_toml,
    from_toml,
    option,
    options,
    toml_schema,
)

TASKS = ("regression", "classification")


@dataclasses.dataclass(frozen=True)
class DataFiles:
    """[data] as array files (.npy, .npz[:key], .csv or Zarr; or a table: IngestOptions)."""

    x_train: str | None = option(None, "training features", section="data")
    y_train: str | None = option(None, "training targets (N,) or (N, C), or class labels",
                                 section="data")  # fmt: skip
    x_test: str | None = option(None, "test features (predictions.npy is written)",
                                section="data")  # fmt: skip
    y_test: str | None = option(None, "test targets (metrics.json holds the test error)",
                                section="data")  # fmt: skip
    table: str | None = option(None, "or a CSV / Parquet table (a file, glob or directory) "
                               "ingested first, with features and target (IngestOptions)",
                               section="data")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class KernelSource:
    """[kernel] naming the whole kernel (instead of FullyConnected's fields)."""

    preset: str | None = option(None, "a preset stax network", section="kernel")
    spec: str | None = option(None, "a kernel written by spec.to_json()", section="kernel")


@dataclasses.dataclass(frozen=True)
class StorePath:
    path: str = option(help="the Gram store: a path relative to the config, or a URL",
                       section="store")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Output:
    dir: str = option(help="output directory: model, predictions, metrics", section="output")
    task: str = option("regression", "regression or classification", section="output",
                       choices=TASKS)  # fmt: skip

    def __post_init__(self) -> None:
        check_choices(self)


def schema() -> dict[str, dict[str, Any]]:
    """The config's sections and keys, all from the option records' fields."""

    return toml_schema(DataFiles, IngestOptions, (FullyConnected, "kernel"), KernelSource,
                       GramOptions, StorePath, SolveOptions, RunOptions, Output)  # fmt: skip


#: The [data] keys that are paths (resolved against the config's directory).
_DATA_PATHS = ("x_train", "y_train", "x_test", "y_test", "table", "test_table")


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
    values = check_toml(raw, schema(), path)
    _check_required(path, values)
    base = os.path.dirname(os.path.abspath(path))
    data = {k: resolve_path(base, v, f"data.{k}") if k in _DATA_PATHS and v is not None else v
            for k, v in values.get("data", {}).items() if v is not None}  # fmt: skip
    out = from_toml(Output, values, path)
    output = {"dir": resolve_path(base, out.dir, "output.dir"), "task": out.task}
    return FitConfig(
        source=path,
        data=data,
        kernel=_kernel(path, base, values),
        store=resolve_path(base, from_toml(StorePath, values, path).path, "store.path"),
        gram=from_toml(GramOptions, values, path),
        solver=from_toml(SolveOptions, values, path),
        run=from_toml(RunOptions, values, path),
        output=output,
        table=_table(path, data, values),
    )


def _check_required(path: str, values: dict[str, dict[str, Any]]) -> None:
    """The keys without a default (store.path, output.dir) must be there."""
    for record in (StorePath, Output):
        for opt in options(record):
            if opt.required and opt.key not in values.get(opt.section, {}):
                raise ValueError(f"{path}: missing required key {opt.section}.{opt.key}")


def _table(path: str, data: dict[str, Any], values: dict[str, dict[str, Any]]) -> Any:
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
    paths = {"test_table": data.get("test_table")} if "test_table" in data else {}
    return from_toml(IngestOptions, {**values, "data": {**values["data"], **paths}}, path,
                     overwrite=True)  # fmt: skip


def _kernel(path: str, base: str, values: dict[str, dict[str, Any]]) -> Any:
    """[kernel]: FullyConnected fields, or ``preset = "myrtle5"``, or ``spec = "spec.json"``
    (a file written by ``spec.to_json()``, relative to the config). ``kind`` is GramOptions'."""
    kern = {k: v for k, v in values.get("kernel", {}).items() if k != "kind"}
    named = [k for k in ("preset", "spec") if k in kern]
    if not named:
        return from_toml(FullyConnected, values, path, section="kernel")
    if len(kern) > 1:
        raise ValueError(f"{path}: [kernel] {named[0]} = ... names the whole kernel; drop the "
                         f"other keys {sorted(set(kern) - {named[0]})}")  # fmt: skip
    if named[0] == "preset":
        if kern["preset"] not in PRESETS:
            raise ValueError(f"{path}: [kernel] preset={kern['preset']!r}; use one of "
                             f"{sorted(PRESETS)} (or FullyConnected fields)")  # fmt: skip
        return PRESETS[kern["preset"]]()
    return load_kernel_spec(resolve_path(base, kern["spec"], "kernel.spec"))


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
        "method": {"method": report.solve.meta.get("method", "exact"),
                   "reason": report.solve.meta.get("method_choice")},
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
