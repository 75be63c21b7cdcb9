"""Posterior standard deviations at scale: the exact multi-RHS PCG route and the sketch estimate,
timed against the mean-only predict and the fit, all in one run (issue N).

Data: the synthetic d = 10 problem of benchmarks/million_rows.py (x ~ N(0, I), a smooth target
plus noise σ = 0.5), N training rows, M test rows. Runs, in this process on a local Ray:

1. fit: ``NTKRegressor(posterior="ntkgp")`` (Gram, stored PCG) at --ridge;
2. predict: the means of the M test rows;
3. sketch: ``variance.sketch_std`` of all M rows (rank --rank);
4. exact: ``predict(return_std=True)``'s route (``variance.posterior_uncertainty``) on the first
   --exact-rows test rows (all its columns in one PCG solve); its time for all M rows is
   extrapolated linearly in the rows (an upper estimate: a block's pass over the store is
   shared by its columns), and the sketch's error is measured on those rows.

Goal (issue N): standard deviations of 10⁴ test rows at N = 10⁵ within 3x the fit's time.
Prints a table; writes benchmarks/results/posterior.json.

    .venv/bin/python benchmarks/posterior.py --n 20000 --m 10000
    .venv/bin/python benchmarks/posterior.py --n 100000 --m 10000      # the goal's size
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from million_rows import D_SYNTHETIC, NOISE, target
from results_io import RESULTS, machine, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="training rows")
    ap.add_argument("--m", type=int, default=10_000, help="test rows")
    ap.add_argument("--exact-rows", type=int, default=512, help="test rows of the exact route")
    ap.add_argument("--ridge", type=float, default=1e-2)
    ap.add_argument("--rank", type=int, default=500, help="preconditioner and sketch pivots")
    ap.add_argument("--tol", type=float, default=1e-4, help="PCG tolerance (fit and std)")
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()

    from ntk_scale import FullyConnected, NTKRegressor, variance

    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.n, D_SYNTHETIC))
    y = target(x) + NOISE * rng.standard_normal(a.n)
    xs = rng.standard_normal((a.m, D_SYNTHETIC))
    work = a.workdir or tempfile.mkdtemp(prefix="posterior-")
    est = NTKRegressor(kernel=FullyConnected(), posterior="ntkgp", ridge=a.ridge, tol=a.tol,
                       rank=a.rank, tile=a.tile, workers=a.workers, workdir=work,
                       dtype="float32")  # fmt: skip
    rows = {}
    t = time.perf_counter()
    est.fit(x, y)
    rows["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    mean = est.predict(xs)
    rows["predict (means)"] = time.perf_counter() - t
    t = time.perf_counter()
    run = est._options()[2]
    sketch = variance.sketch_std(est.store_, xs, "ntkgp", ridge=est.solve_report_.lam,
                                 ridge_absolute=True, rank=a.rank, run=run)  # fmt: skip
    rows["sketch std (all rows)"] = time.perf_counter() - t
    k = min(a.exact_rows, a.m)
    t = time.perf_counter()
    _, exact = est.predict(xs[:k], return_std=True)
    per_block = time.perf_counter() - t
    rows[f"exact std ({k} rows)"] = per_block
    # linear in the rows: a block's solve costs its columns' products plus one pass over the
    # store per iteration, shared by the block's columns (so this is an upper estimate)
    rows["exact std (all rows, extrapolated)"] = per_block * a.m / k
    err = np.abs(sketch[:k] - exact) / exact
    rmse = float(np.sqrt(np.mean((mean - target(xs)) ** 2)))
    inside = float(np.mean(np.abs(mean[:k] - target(xs[:k])) <= 2 * np.sqrt(exact**2 + NOISE**2)))
    result = {
        "machine": machine(), "config": vars(a), "seconds": rows,
        "ratio_to_fit": {name: s / rows["fit"] for name, s in rows.items()},
        "fit_iterations": int(est.n_iter_), "test_rmse": rmse,
        "sketch_vs_exact": {"median_relative_error": float(np.median(err)),
                            "p90_relative_error": float(np.quantile(err, 0.9)),
                            "max_relative_error": float(np.max(err))},
        "two_sigma_coverage_of_f_plus_noise": inside,
    }  # fmt: skip
    print(f"\nN = {a.n:,} training rows, M = {a.m:,} test rows, d = {D_SYNTHETIC}, "
          f"posterior ntkgp, ridge {a.ridge:g}, rank {a.rank}")  # fmt: skip
    print(f"  {'stage':38s} {'seconds':>9s} {'x fit':>7s}")
    for name, s in rows.items():
        print(f"  {name:38s} {s:9.1f} {s / rows['fit']:7.2f}")
    e = result["sketch_vs_exact"]
    print(f"  sketch vs exact std on {k} rows: median {e['median_relative_error']:.3g}, "
          f"p90 {e['p90_relative_error']:.3g}, max {e['max_relative_error']:.3g}")
    write_json(RESULTS / "posterior.json", result)


if __name__ == "__main__":
    main()
