"""Many ridges from one stored Gram: a regularization path in one PCG run, and the ridge chosen
on held-out folds of the same store, against one solve per ridge and GridSearchCV.

Data: the solver benchmark's teacher-student set (``benchmarks/solver.py``: X of intrinsic
dimension --latent in d = --d, --rhs targets, a held-out test set), FC-3 ReLU NTK, a float32
store, the StoredOperator (tiles streamed from the store), RPCholesky of --rank pivots.

Rows, all in one run on this machine:

1. ``path``: all ridges (12 from 1e-6 to 1e-1 relative), every target, in one PCG run;
2. ``single``: the one solve at the smallest ridge (the slowest to converge);
3. ``separate``: one solve per ridge, each measured (not extrapolated);
4. ``select``: --folds-fold selection of the ridge on the same store (every fold, ridge and
   target in one run; each fold preconditioned by the sketch restricted to its training rows)
   and the refit on all rows at the chosen ridge, started from that ridge's fold solutions;
5. ``gridsearch``: GridSearchCV over NTKRegressor with the same grid and folds (one Gram store
   per fold and one for the refit, the ridges of a fold reusing its store), unless
   --no-gridsearch.

Goals: path <= 3x single; the chosen ridge's test error vs the best ridge in hindsight (from
the path's solutions on the test set). Prints a table; writes
benchmarks/results/ridge_path.json.

    .venv/bin/python benchmarks/ridge_path.py                       # N = 20,000 (the full run)
    .venv/bin/python benchmarks/ridge_path.py --n 4000 --no-gridsearch
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
from results_io import RESULTS, machine, write_json
from solver import SPEC, heldout_error, heldout_kernel, make_data

from ntk_scale import NTKRegressor, stages
from ntk_scale.options import GramOptions, RunOptions, SolveOptions
from ntk_scale.solve import make_folds, select_ridge, solve_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--latent", type=int, default=4)
    ap.add_argument("--rhs", type=int, default=10)
    ap.add_argument("--ridges", type=int, default=12, help="log-spaced in [1e-6, 1e-1]")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--rank", type=int, default=500)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-gridsearch", action="store_true")
    ap.add_argument("--no-select", action="store_true",
                    help="only the path, the single and the separate solves")  # fmt: skip
    ap.add_argument("--out", default=str(RESULTS / "ridge_path.json"))
    a = ap.parse_args()
    X, Y, Xt, Yt = make_data(a.n, a.n_test, a.d, a.latent, a.rhs, 0)
    ridges = tuple(float(r) for r in np.logspace(-6, -1, a.ridges))
    work = tempfile.mkdtemp(prefix="ridge-path-")
    run = RunOptions(workers=a.workers, progress=False)
    store = f"{work}/gram.zarr"
    t = time.perf_counter()
    stages.gram(X, SPEC, store, GramOptions(dtype="float32", tile=min(a.tile, a.n)), run)
    gram_s = time.perf_counter() - t
    opts = SolveOptions(ridge=ridges, tol=a.tol, rank=a.rank, pivot_block=50)
    rows, Kt = {}, heldout_kernel(Xt, X, "float32")

    partial, separate = str(Path(a.out).with_suffix(".partial.json")), []

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        done = {"seconds": rows, "separate_seconds": separate, "last_step_seconds": seconds}
        write_json(partial, {"config": vars(a), "gram_seconds": gram_s, **done})
        return out, seconds

    path, rows["path"] = timed(lambda: solve_store(store, Y, opts, run))
    errors = [heldout_error(Kt, path.alpha(k), Yt) for k in range(len(ridges))]
    its = path.iterations_per_ridge(a.tol)
    one = SolveOptions(ridge=ridges[0], tol=a.tol, rank=a.rank, pivot_block=50)
    _, rows["single"] = timed(lambda: solve_store(store, Y, one, run))
    for r in ridges:
        o = SolveOptions(ridge=r, tol=a.tol, rank=a.rank, pivot_block=50)
        separate.append(timed(lambda o=o: solve_store(store, Y, o, run))[1])
    rows["separate"] = sum(separate)
    folds = make_folds(a.n, cv=a.folds, seed=0)
    sel = chosen_err = grid = refit_its = None
    if not a.no_select:
        sel, sel_s = timed(lambda: select_ridge(store, Y, opts, run, folds=folds))
        refit_opts = SolveOptions(ridge=sel.ridge, tol=a.tol, rank=a.rank, pivot_block=50)
        refit, refit_s = timed(lambda: solve_store(store, Y, refit_opts, run, x0=sel.warm_start))
        rows["select"] = sel_s + refit_s
        rows["selection_only"], rows["refit"] = sel_s, refit_s
        refit_its = refit.result.iterations
        chosen_err = heldout_error(Kt, refit.alpha(), Yt)
    if not (a.no_gridsearch or a.no_select):
        grid = _gridsearch(X, Y, ridges, folds, a, f"{work}/grid")
        rows["gridsearch"] = grid["seconds"]
    best = int(np.argmin(errors))
    result = {
        "machine": machine(), "config": vars(a), "gram_seconds": gram_s,
        "ridges": list(ridges), "seconds": rows, "separate_seconds": separate,
        "iterations_per_ridge": its, "test_error_per_ridge": errors,
        "chosen_ridge": sel and sel.ridge, "chosen_test_error": chosen_err,
        "best_ridge_in_hindsight": ridges[best], "best_test_error": errors[best],
        "validation_mse": sel and sel.mean_scores.tolist(),
        "selection_iterations": sel and sel.iterations,
        "refit_iterations_warm_started": refit_its,
        "path_over_single": rows["path"] / rows["single"],
        "path_over_separate": rows["path"] / rows["separate"],
        "select_over_gridsearch": None if grid is None else rows["select"] / grid["seconds"],
        "gridsearch": grid,
    }  # fmt: skip
    _print(result)
    write_json(a.out, result)
    Path(partial).unlink(missing_ok=True)


def _gridsearch(X, Y, ridges, folds, a, workdir) -> dict:
    from sklearn.model_selection import GridSearchCV

    est = NTKRegressor(kernel=SPEC, dtype="float32", tile=min(a.tile, a.n), tol=a.tol,
                       rank=a.rank, workdir=workdir, workers=a.workers)  # fmt: skip
    start = time.perf_counter()
    search = GridSearchCV(est, {"ridge": list(ridges)}, cv=folds,
                          scoring="neg_mean_squared_error").fit(X, Y)  # fmt: skip
    return {"seconds": time.perf_counter() - start, "best_ridge": search.best_params_["ridge"]}


def _print(r: dict) -> None:
    s = r["seconds"]
    print(
        f"N = {r['config']['n']}, {len(r['ridges'])} ridges x {r['config']['rhs']} targets, "
        f"{r['config']['folds']} folds; Gram {r['gram_seconds']:.1f} s"
    )
    print(
        f"  path (all ridges, one run)   {s['path']:8.1f} s   = {r['path_over_single']:.2f} x "
        f"single, {r['path_over_separate']:.2f} x separate"
    )
    print(f"  single (smallest ridge)      {s['single']:8.1f} s")
    print(f"  separate (one per ridge)     {s['separate']:8.1f} s")
    grid = (
        "" if r["gridsearch"] is None else f"   = {r['select_over_gridsearch']:.3f} x GridSearchCV"
    )
    if "select" in s:
        print(f"  select ({r['config']['folds']} folds) + refit    {s['select']:8.1f} s{grid}")
    if r["gridsearch"] is not None:
        print(f"  GridSearchCV(NTKRegressor)   {s['gridsearch']:8.1f} s")
    if r["chosen_ridge"] is not None:
        print(
            f"  chosen ridge {r['chosen_ridge']:.3g}: test error {r['chosen_test_error']:.4f}; "
            f"refit {r['refit_iterations_warm_started']} iterations from the folds' solutions"
        )
    print(f"  best in hindsight {r['best_ridge_in_hindsight']:.3g}: {r['best_test_error']:.4f}")
    val = r["validation_mse"] or [None] * len(r["ridges"])
    sel_its = r["selection_iterations"] or [None] * len(r["ridges"])
    rows = zip(r["ridges"], r["iterations_per_ridge"], r["test_error_per_ridge"], val, sel_its,
               strict=True)  # fmt: skip
    for ridge, it, err, v, si in rows:
        cv = "" if v is None else f"  validation MSE {v:.5f} ({si} iterations in the folds)"
        print(f"    ridge {ridge:9.3g}  {it:4d} iterations  test error {err:.4f}{cv}")


if __name__ == "__main__":
    main()
