"""The sketch estimate's error against the exact std as its rank grows, on the store a
benchmarks/posterior.py run left in --workdir (the same data: seed 0, N training rows, M test).

The exact std of the first --exact-rows test rows (one multi-RHS PCG, the fit's sketch reused),
then ``variance.sketch_std`` of all M rows at each --ranks, timed, with its relative error on
those rows. Prints a table; writes benchmarks/results/posterior_n<N>_sketch_ranks.json.

    .venv/bin/python benchmarks/posterior.py --n 100000 --m 10000 --exact-rows 64 --workdir W
    .venv/bin/python benchmarks/posterior_sketch_ranks.py --workdir W --ranks 500,2000
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from million_rows import D_SYNTHETIC
from results_io import RESULTS, machine, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="posterior.py's --workdir")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--m", type=int, default=10_000)
    ap.add_argument("--exact-rows", type=int, default=64)
    ap.add_argument("--ranks", default="500,2000")
    ap.add_argument("--ridge", type=float, default=1e-2)
    a = ap.parse_args()

    from ntk_scale import variance
    from ntk_scale.options import RunOptions, SolveOptions

    rng = np.random.default_rng(0)  # posterior.py's draws, in its order
    rng.standard_normal((a.n, D_SYNTHETIC))
    rng.standard_normal(a.n)
    xs = rng.standard_normal((a.m, D_SYNTHETIC))
    store = glob.glob(os.path.join(a.workdir, "gram-*.zarr"))[0]
    run = RunOptions(workers=2, progress=False)
    t = time.perf_counter()
    exact = variance.posterior_uncertainty(
        store, xs[: a.exact_rows], "ntkgp", ridge=a.ridge, run=run, sketch_dir=store + ".sketch",
        options=SolveOptions(rank=500, tol=1e-4, operator="stored"))  # fmt: skip
    exact = np.asarray(exact).ravel()
    out = {"machine": machine(), "config": vars(a), "store": store, "ranks": {},
           "exact_seconds": time.perf_counter() - t, "exact": exact.tolist()}  # fmt: skip
    print(f"exact std of {a.exact_rows} rows: {out['exact_seconds']:.1f} s", flush=True)
    for r in map(int, a.ranks.split(",")):
        t = time.perf_counter()
        s = np.asarray(variance.sketch_std(store, xs, "ntkgp", ridge=a.ridge, rank=r, run=run))
        signed = (s.ravel()[: a.exact_rows] - exact) / exact
        err = np.abs(signed)
        out["ranks"][r] = {"seconds_all_rows": time.perf_counter() - t,
                           "median": float(np.median(err)), "p90": float(np.quantile(err, 0.9)),
                           "max": float(err.max()),
                           "mean_signed": float(np.mean(signed))}  # fmt: skip
        print(f"rank {r:5d}: {out['ranks'][r]}", flush=True)
        write_json(RESULTS / f"posterior_n{a.n}_sketch_ranks.json", out)


if __name__ == "__main__":
    main()
