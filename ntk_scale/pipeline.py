"""The three stages on files (gram -> solve -> predict), shared by the CLI and the demo.

Every input is loaded and validated before the first byte is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import fsspec
import numpy as np

from ntk_scale.config import FitConfig
from ntk_scale.kernels import check_features
from ntk_scale.model import load_model, save_model
from ntk_scale.scheduler import RunOptions, compute_gram
from ntk_scale.store import GramStore


@dataclasses.dataclass(frozen=True)
class Inputs:
    x_train: Any
    y_train: np.ndarray  # (N,) or (N, C) float64 targets (one-hot for classification)
    classes: np.ndarray | None
    x_test: Any | None
    y_test: np.ndarray | None


def prepare_inputs(x_train, y_train, x_test=None, y_test=None, task="regression") -> Inputs:
    """Validate everything up front: shapes, widths, NaN, labels."""
    from ntk_scale.solve import check_targets

    n, d = x_train.shape if len(getattr(x_train, "shape", ())) == 2 else (None, None)
    if n is None:
        check_features(x_train, "x_train")
    classes = None
    y = np.asarray(y_train)
    if task == "classification":
        if y.ndim != 1:
            raise ValueError(f"y_train must be 1-D class labels for classification, got {y.shape}")
        classes, codes = np.unique(y, return_inverse=True)
        y = np.eye(len(classes))[codes]
    check_targets(y, n)
    if x_test is not None and (len(x_test.shape) != 2 or x_test.shape[1] != d):
        raise ValueError(
            f"x_test has shape {tuple(x_test.shape)} but the training data has {d} features; "
            "test features must have the training width"
        )
    if y_test is not None and x_test is not None and len(y_test) != x_test.shape[0]:
        raise ValueError(f"y_test has {len(y_test)} rows but x_test has {x_test.shape[0]}")
    return Inputs(x_train, np.asarray(y, dtype=np.float64), classes, x_test, y_test)


def stage_solve(
    store_url: str,
    y: np.ndarray,
    model_dir: str,
    solver: dict[str, Any],
    workers: int | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Solve on a stored Gram, write the model directory and its plots. Returns the report."""
    from ntk_scale.plots import plot_residuals, plot_spectrum
    from ntk_scale.solve import solve_store

    opts = {"ridge": 1e-4, "tol": 1e-6, **solver}
    opts["rank"] = min(int(opts.get("rank", 500)), y.shape[0])
    report = solve_store(
        store_url, y, out_dir=os.path.join(model_dir, "checkpoint"), workers=workers or 2, **opts
    )
    store = GramStore.open(store_url)
    res = report.result
    meta = {
        "kernel": store.meta.kernel,
        "kind": store.meta.kind,
        "dtype": store.meta.dtype,
        "ridge": opts["ridge"],
        "ridge_absolute": bool(opts.get("ridge_absolute", False)),
        "lam": report.lam,
        "store": store_url,
        "store_fingerprint": store.fingerprint,
        "solver": {
            "preconditioner": report.preconditioner,
            "rank": report.rank,
            "tol": opts["tol"],
            "iterations": int(res.iterations),
            "converged": np.asarray(res.converged).tolist(),
            "final_relative_residuals": np.asarray(res.residuals)[-1].tolist(),
            "setup_seconds": report.setup_seconds,
            "iteration_seconds": report.iteration_seconds,
            "resumed_from": report.resumed_from,
        },
        **(extra or {}),
    }
    save_model(model_dir, res.x, meta)
    if "://" not in model_dir:
        meta["plots"] = [plot_residuals(res.residuals, opts["tol"], f"{model_dir}/residuals.png")]
        eig = getattr(report, "eigenvalues", None)
        if eig is not None and len(eig):
            meta["plots"].append(plot_spectrum(eig, report.lam, f"{model_dir}/spectrum.png"))
    return meta


def stage_predict(
    model_dir: str,
    x_star: Any,
    store_url: str | None = None,
    workers: int | None = None,
    address: str | None = None,
) -> np.ndarray:
    """K(x_star, X) @ A for the model in model_dir; store_url overrides the recorded store."""
    from ntk_scale.predict import predict_from_store

    model = load_model(model_dir)
    url = store_url or model.store_url
    model = load_model(model_dir, GramStore.open(url))
    return predict_from_store(url, model.alpha, np.asarray(x_star), workers, address)


def metrics(pred: np.ndarray, y: np.ndarray, classes: np.ndarray | None) -> dict[str, float]:
    if classes is not None:
        labels = classes[np.argmax(pred, axis=1)]
        return {"accuracy": float(np.mean(labels == np.asarray(y)))}
    y = np.asarray(y, dtype=np.float64).reshape(pred.shape)
    mse = float(np.mean((pred - y) ** 2))
    return {"mse": mse, "r2": float(1 - mse / np.mean((y - y.mean(axis=0)) ** 2))}


def run_fit(cfg: FitConfig) -> dict[str, Any]:
    """All stages from a validated config. Returns the metrics written to OUT/metrics.json."""
    from ntk_scale.io import load_array, load_targets

    d = cfg.data
    x_test = load_array(d["x_test"]) if "x_test" in d else None
    y_test = np.asarray(load_array(d["y_test"])) if "y_test" in d else None
    task = cfg.output["task"]
    y_train = (
        np.asarray(load_array(d["y_train"]))
        if task == "classification"
        else load_targets(d["y_train"])
    )
    inputs = prepare_inputs(load_array(d["x_train"]), y_train, x_test, y_test, task)
    out = cfg.output["dir"]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    run = RunOptions(workers=cfg.run.get("workers"), address=cfg.run.get("address") or None)
    st = cfg.store
    gram = compute_gram(
        inputs.x_train,
        cfg.kernel,
        st["path"],
        kind=cfg.kind,
        dtype=st["dtype"],
        tile=st["tile"],
        overwrite=st["overwrite"],
        options=run,
    )
    timings["gram_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    extra = {"classes": None if inputs.classes is None else inputs.classes.tolist(), "task": task}
    meta = stage_solve(st["path"], inputs.y_train, f"{out}/model", cfg.solver, run.workers, extra)
    timings["solve_s"] = time.perf_counter() - t1
    result: dict[str, Any] = {"gram": gram.summary(), "solver": meta["solver"], "timings": timings}
    if inputs.x_test is not None:
        t2 = time.perf_counter()
        pred = stage_predict(f"{out}/model", inputs.x_test, st["path"], run.workers, run.address)
        timings["predict_s"] = time.perf_counter() - t2
        write_npy(
            f"{out}/predictions.npy",
            pred if inputs.classes is None else inputs.classes[np.argmax(pred, axis=1)],
        )
        if inputs.y_test is not None:
            result["test"] = metrics(pred, inputs.y_test, inputs.classes)
    result["plots"] = meta.get("plots", [])
    write_json(f"{out}/metrics.json", result)
    return result


def write_npy(path: str, array: np.ndarray) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(root), exist_ok=True)
    with fs.open(root, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def write_json(path: str, obj: Any) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(root), exist_ok=True)
    with fs.open(root, "w") as f:
        json.dump(obj, f, indent=2, default=str)
