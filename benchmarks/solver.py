"""Solver benchmark: preconditioned CG on a stored FC-3 ReLU NTK Gram against dense Cholesky.

Teacher-student data (numpy): X = Z A with Z ~ N(0, I_k) of intrinsic dimension k = ``--latent``
embedded in d dimensions (A: k orthonormal rows scaled so E||x||² = d), targets from a random
two-layer ReLU teacher with ``--rhs`` outputs plus 10% noise; a held-out set of ``--n-test``
points. Real inputs (images) have a low intrinsic dimension, which makes the NTK Gram
ill-conditioned; isotropic Gaussians (``--latent`` = d) give an easy, well-conditioned system.
The training Gram is built with ``stages.gram`` (float32 store by default) and reused when it
already exists.

For each ridge λ = r · mean(diag K), r in ``--ridges``, it reports the iterations and seconds to
``--tol`` of PCG on the StoredOperator with RPCholesky and Nyström (uniform pivots) at each rank in
``--ranks``, Jacobi and no preconditioner, and the wall time of a dense Cholesky solve of the
float64 matrix in memory, each with its relative test error. The dense Cholesky is blocked
(right-looking, 2,048-wide panels: one-thread dpotrf on the diagonal block, trsm and gemm
updates on every core), because OpenBLAS's own multi-threaded dpotrf segfaults on this VM at
N = 20,000 and its one-thread dpotrf takes 1.8x as long. No preconditioner and Jacobi are run
to at most ``--cap-factor`` x RPCholesky's iterations at the largest rank (and ``--max-iter``):
a capped run shows the ratio is below 1/cap-factor without paying for thousands of products.

Every ``--trace-every`` iterations a callback records the test error of the current iterate and
the wall time so far (setup included, the callback's own time excluded), so the table also gives
the seconds each PCG solve needs to come within 1 % of Cholesky's test error ("equal test
error"), besides its seconds to ``--tol``.

Throughput: one StoredOperator product (stored bytes / seconds) with the store's chunk files
first dropped from the page cache (posix_fadvise DONTNEED; local stores) against reading the
same files, equally dropped, with plain unbuffered reads (the raw disk rate); and the same
two with the files cached (page-cache rates, where the product is bound by its arithmetic).

Goals: RPCholesky iterations <= 1/10 of none at the smallest λ; PCG wall <= 1/10 of dense
Cholesky at equal test error; stored read throughput >= 0.8 of the raw disk rate.

    .venv/bin/python benchmarks/solver.py                 # N = 20,000 (the full run)
    .venv/bin/python benchmarks/solver.py --n 2000        # smoke test

Results: ``benchmarks/results/solver.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import scipy.linalg
import threadpoolctl
from results_io import RESULTS, machine, write_json

from ntk_scale import FullyConnected, stages
from ntk_scale.linalg import ConvergenceWarning, SolverError
from ntk_scale.linalg.stored import StoredOperator
from ntk_scale.options import GramOptions, RunOptions
from ntk_scale.sizing import drop_page_cache, read_rate
from ntk_scale.solve import solve_store
from ntk_scale.store import GramStore

DEFAULT_OUT = RESULTS / "solver.json"
SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)
#: A PCG solve "equals" Cholesky's test error when within this relative difference.
EQUAL_ERROR = 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000, help="training points")
    p.add_argument("--n-test", type=int, default=2000, help="held-out test points")
    p.add_argument("--d", type=int, default=32, help="input dimension")
    p.add_argument("--latent", type=int, default=4, help="intrinsic dimension k <= d")
    p.add_argument("--rhs", type=int, default=10, help="right-hand sides (teacher outputs)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--tile", type=int, default=None, help="default: 2048, or 512 when n < 8192")
    p.add_argument("--ridges", default="1e-2,1e-4,1e-6", help="relative ridges (x mean diag)")
    p.add_argument("--ranks", default="100,300,1000", help="Nyström / RPCholesky ranks")
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--max-iter", type=int, default=3000, help="PCG iteration cap")
    p.add_argument(
        "--cap-factor",
        type=int,
        default=10,
        help="none / Jacobi stop after this many times RPCholesky's iterations (largest rank)",
    )
    p.add_argument("--trace-every", type=int, default=5, help="test-error trace interval")
    p.add_argument(
        "--operator",
        default="stored",
        choices=("stored", "dense", "distributed"),
        help="operator for the PCG solves (iteration counts do not depend on it; dense = the "
        "float64 matrix in memory, fastest on one small machine)",
    )
    p.add_argument("--pivot-block", type=int, default=50, help="accelerated RPCholesky block")
    p.add_argument("--workers", type=int, default=2, help="Ray workers building the store")
    p.add_argument("--store", default=None, help="store path (default: a temp dir, reused)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# -- data and the store ------------------------------------------------------------------------


def make_data(n: int, n_test: int, d: int, latent: int, rhs: int, seed: int):
    """Teacher-student regression: (X (n, d), Y (n, rhs), X_test, Y_test), float64."""
    if not 1 <= latent <= d:
        raise SystemExit(f"--latent={latent} must lie in [1, --d={d}]")
    rng = np.random.default_rng(seed)
    A = np.linalg.qr(rng.standard_normal((d, latent)))[0].T * np.sqrt(d / latent)
    X = rng.standard_normal((n + n_test, latent)) @ A
    W1 = rng.standard_normal((d, 256)) * np.sqrt(2.0 / d)
    W2 = rng.standard_normal((256, rhs)) / np.sqrt(256)
    Y = np.maximum(X @ W1, 0.0) @ W2
    Y += 0.1 * Y.std(axis=0) * rng.standard_normal(Y.shape)
    return X[:n], Y[:n], X[n:], Y[n:]


def build_store(args, X) -> tuple[str, float]:
    tile = args.tile or (2048 if args.n >= 8192 else 512)
    url = args.store or os.path.join(
        tempfile.gettempdir(),
        f"ntk_scale_bench/solver_n{args.n}_d{args.d}_k{args.latent}_{args.dtype}.zarr",
    )
    start = time.perf_counter()
    opts = RunOptions(workers=args.workers, progress=False)
    report = stages.gram(X, SPEC, url, GramOptions(dtype=args.dtype, tile=tile), opts)
    print(f"store {url}: {report.summary()}", flush=True)
    import ray

    if ray.is_initialized():
        ray.shutdown()  # free the workers' memory before the dense Cholesky
    return url, time.perf_counter() - start


def heldout_kernel(X_test, X, dtype: str, chunk: int = 500) -> np.ndarray:
    """K(X_test, X): (n_test, n) float64, computed in row chunks."""
    parts = [
        SPEC.kernel(X_test[i : i + chunk], X, dtype=dtype) for i in range(0, len(X_test), chunk)
    ]
    return np.vstack(parts).astype(np.float64)


def heldout_error(Kt: np.ndarray, A: np.ndarray, Y_test: np.ndarray) -> float:
    """Relative test error ||K_t A − Y_t||² / ||Y_t − mean||²."""
    resid = Kt @ A - Y_test
    return float(np.sum(resid**2) / np.sum((Y_test - Y_test.mean(axis=0)) ** 2))


# -- throughput --------------------------------------------------------------------------------


def chunk_files(url: str) -> list[str]:
    """The local paths of the store's tile chunks (what a product reads)."""
    root = os.path.join(url, "gram", "c")
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


def stored_rates(url: str, rhs: int, repeats: int = 3) -> dict:
    """Bytes / second of one StoredOperator product and of raw reads of the same chunk files,
    each with the files dropped from the page cache (cold: the disk) and cached (warm).
    Cold and warm runs alternate product / raw, so both see the same machine state."""
    op = StoredOperator(url)
    files = chunk_files(url)
    P = np.random.default_rng(0).standard_normal((op.shape[0], rhs))
    out: dict[str, list[float]] = {
        k: [] for k in ("cold_product", "cold_raw", "warm_product", "warm_raw")
    }
    for _ in range(repeats):
        drop_page_cache(files)
        op.matmat(P)
        out["cold_product"].append(op.stored_bytes / op.last_product_seconds)
        drop_page_cache(files)
        out["cold_raw"].append(read_rate(files))
        op.matmat(P)
        out["warm_product"].append(op.stored_bytes / op.last_product_seconds)
        out["warm_raw"].append(read_rate(files))
    rates = {f"{k}_bytes_per_s": statistics.median(v) for k, v in out.items()}
    return {
        "stored_bytes": op.stored_bytes,
        "chunk_file_bytes": sum(os.path.getsize(f) for f in files),
        "read_ahead": op.read_ahead,
        **rates,
        "runs": out,
    }


# -- solves ------------------------------------------------------------------------------------


def blocked_cholesky(A: np.ndarray, block: int = 2048) -> np.ndarray:
    """In-place lower Cholesky factor of A (n, n) float64, right-looking by ``block`` panels:
    one-thread dpotrf on each diagonal block, then trsm and gemm updates with every BLAS thread.
    Only the lower triangle of the result is the factor (cho_solve(lower=True) reads only it)."""
    n = len(A)
    for k in range(0, n, block):
        e = min(k + block, n)
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            A[k:e, k:e] = scipy.linalg.cholesky(A[k:e, k:e], lower=True, check_finite=False)
        if e == n:
            break
        panel = scipy.linalg.solve_triangular(
            A[k:e, k:e], A[e:, k:e].T, lower=True, check_finite=False
        )
        A[e:, k:e] = panel.T
        for j in range(e, n, block):
            je = min(j + block, n)
            A[j:, j:je] -= A[j:, k:e] @ A[j:je, k:e].T
    return A


def cholesky_row(K: np.ndarray, Y, Kt, Y_test, lam: float) -> dict:
    start = time.perf_counter()
    try:
        A = K.copy()
        A[np.diag_indices_from(A)] += lam
        L = blocked_cholesky(A)
        if not np.all(np.isfinite(np.diag(L))):
            raise np.linalg.LinAlgError("the factor has non-finite entries")
        X = scipy.linalg.cho_solve((L, True), Y, check_finite=False)
    except np.linalg.LinAlgError as err:
        return {"method": "cholesky", "seconds": time.perf_counter() - start, "error": str(err)}
    seconds = time.perf_counter() - start
    return {"method": "cholesky", "seconds": seconds, "test_error": heldout_error(Kt, X, Y_test)}


def pcg_row(url, Y, Kt, Y_test, ridge, name, rank, args, max_iter, ref_error) -> dict:
    """One PCG solve; ``ref_error``: Cholesky's test error at this ridge (or None)."""
    label = name if name in ("none", "jacobi") else f"{name}-{rank}"
    row = {"method": label, "preconditioner": name, "rank": rank, "max_iter": max_iter}
    trace: list[tuple[int, float, float]] = []  # (iteration, seconds so far, test error)
    spent = [0.0]  # seconds inside the callback, excluded from the trace's times
    start = time.perf_counter()

    def record(st) -> None:
        if st.iteration % args.trace_every:
            return
        t0 = time.perf_counter()
        err = heldout_error(Kt, st.x, Y_test)
        trace.append((st.iteration, t0 - start - spent[0], err))
        spent[0] += time.perf_counter() - t0

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            rep = solve_store(
                url, Y, ridge=ridge, preconditioner=name, rank=rank, tol=args.tol,
                max_iter=max_iter, pivot_block=args.pivot_block, seed=args.seed,
                operator=args.operator, callback=record,
            )  # fmt: skip
    except (SolverError, ValueError) as err:
        return {**row, "error": str(err)}
    res = rep.result
    out = {
        **row,
        "iterations": res.iterations,
        "converged": bool(res.converged.all()),
        "setup_s": rep.setup_seconds,
        "iterations_s": rep.iteration_seconds - spent[0],
        "seconds": rep.setup_seconds + rep.iteration_seconds - spent[0],
        "test_error": heldout_error(Kt, res.x, Y_test),
        "trace": trace,
    }
    if ref_error is not None:
        hit = next((t for t in trace if abs(t[2] - ref_error) <= EQUAL_ERROR * ref_error), None)
        out["equal_error_iteration"] = hit[0] if hit else None
        out["equal_error_s"] = hit[1] if hit else None
    return out


def methods(ranks: list[int]) -> list[tuple[str, int]]:
    """RPCholesky first (largest rank first: its iterations cap none / Jacobi), then Nyström."""
    desc = sorted(ranks, reverse=True)
    return [(m, r) for m in ("rpcholesky", "nystrom") for r in desc] + [("none", 0), ("jacobi", 0)]


# -- goals and the table -----------------------------------------------------------------------


def goal_iterations(rows: list[dict], ridge: float, ranks: list[int]) -> dict:
    """RPCholesky (largest rank) iterations <= 1/10 of none's at the smallest ridge."""
    at = {r["method"]: r for r in rows if r["ridge"] == ridge}
    none, rpc = at.get("none", {}), at.get(f"rpcholesky-{max(ranks)}", {})
    if "iterations" not in none or not rpc.get("converged"):
        return {"met": False, "note": "a solve failed or RPCholesky did not converge"}
    ratio = rpc["iterations"] / none["iterations"]
    met = ratio <= 0.1
    note = "" if none["converged"] else f"none stopped at max_iter={none['iterations']}: "
    if not none["converged"] and not met:
        note += "undetermined (raise --max-iter)"
    elif not none["converged"]:
        note += "the ratio is an upper bound"
    return {"ratio": ratio, "met": met, "note": note}


def goal_wall(rows: list[dict], chol: dict[float, dict]) -> dict:
    """At the ridge where Cholesky's test error is best: the PCG solve that comes within
    EQUAL_ERROR of that test error soonest (seconds from the start, setup included), and its
    wall ratio to Cholesky (goal <= 1/10). Also the fastest solve converged to --tol."""
    ok = {r: c for r, c in chol.items() if "test_error" in c}
    if not ok:
        return {"met": False, "note": "dense Cholesky failed at every ridge"}
    ridge = min(ok, key=lambda r: ok[r]["test_error"])
    ref = ok[ridge]
    at = [r for r in rows if r["ridge"] == ridge and r.get("equal_error_s") is not None]
    conv = [r for r in rows if r["ridge"] == ridge and r.get("converged")]
    out: dict = {"ridge": ridge, "cholesky_s": ref["seconds"]}
    if conv:
        best = min(conv, key=lambda r: r["seconds"])
        out["fastest_to_tol"] = {"method": best["method"], "seconds": best["seconds"]}
        out["fastest_to_tol_ratio"] = best["seconds"] / ref["seconds"]
    if not at:
        return {**out, "met": False, "note": "no PCG solve reached Cholesky's test error"}
    best = min(at, key=lambda r: r["equal_error_s"])
    ratio = best["equal_error_s"] / ref["seconds"]
    return {
        **out,
        "method": best["method"],
        "iteration": best["equal_error_iteration"],
        "seconds": best["equal_error_s"],
        "ratio": ratio,
        "met": ratio <= 0.1,
    }


def print_table(rows: list[dict]) -> None:
    head = f"{'ridge':>7} {'method':<16} {'iters':>6} {'conv':>5} {'setup s':>8} "
    print(head + f"{'iter s':>8} {'total s':>8} {'test err':>9} {'=err s':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['ridge']:>7.0e} {r['method']:<16} failed: {r['error'][:70]}")
            continue
        its = r.get("iterations", "")
        conv = {True: "yes", False: "NO"}.get(r.get("converged"), "")
        cells = [
            f"{v:>8.2f}" if v is not None else f"{'':>8}"
            for v in (r.get("setup_s"), r.get("iterations_s"), r["seconds"])
        ]
        eq = r.get("equal_error_s")
        eq_cell = f"{eq:>8.2f}" if eq is not None else f"{'-' if 'trace' in r else '':>8}"
        print(
            f"{r['ridge']:>7.0e} {r['method']:<16} {its!s:>6} {conv:>5} {' '.join(cells)} "
            f"{r['test_error']:>9.5f} {eq_cell}"
        )


def print_goals(goals: dict) -> None:
    print("\ngoals:")
    for name, g in goals.items():
        ratio = f"{g['ratio']:.3f}" if "ratio" in g else "-"
        extra = {k: v for k, v in g.items() if k not in ("ratio", "met")}
        print(f"  {name:<34} ratio {ratio:>7}  {'MET' if g['met'] else 'not met'}  {extra}")


# -- main --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    ridges = [float(r) for r in args.ridges.split(",")]
    ranks = [int(r) for r in args.ranks.split(",") if int(r) <= args.n]
    X, Y, X_test, Y_test = make_data(args.n, args.n_test, args.d, args.latent, args.rhs, args.seed)
    url, build_s = build_store(args, X)
    Kt = heldout_kernel(X_test, X, args.dtype)
    rates = stored_rates(url, args.rhs)
    store = GramStore.open(url)
    start = time.perf_counter()
    K = store.to_dask().compute().astype(np.float64)
    load_s = time.perf_counter() - start
    mean_diag = float(np.mean(store.diagonal()))
    rows, chol = [], {}
    for ridge in ridges:
        chol[ridge] = {"ridge": ridge, **cholesky_row(K, Y, Kt, Y_test, ridge * mean_diag)}
        rows.append(chol[ridge])
        print_table([chol[ridge]])
        cap = args.max_iter
        for name, rank in methods(ranks):
            limit = cap if name in ("none", "jacobi") else args.max_iter
            ref = chol[ridge].get("test_error")
            row = {
                "ridge": ridge,
                **pcg_row(url, Y, Kt, Y_test, ridge, name, rank, args, limit, ref),
            }
            if name == "rpcholesky" and rank == max(ranks) and row.get("converged"):
                cap = min(args.max_iter, args.cap_factor * row["iterations"] + 1)
            rows.append(row)
            print_table([row])
    del K
    pcg = [r for r in rows if r["method"] != "cholesky"]
    goals = {
        "rpcholesky_iters_<=_0.1_none": goal_iterations(pcg, min(ridges), ranks),
        "pcg_wall_<=_0.1_cholesky": goal_wall(pcg, chol),
        "stored_read_>=_0.8_raw": {
            "ratio": rates["cold_product_bytes_per_s"] / rates["cold_raw_bytes_per_s"],
            "met": rates["cold_product_bytes_per_s"] >= 0.8 * rates["cold_raw_bytes_per_s"],
            "note": "both read the chunk files after dropping them from the page cache",
        },
    }
    return {
        "config": {**vars(args), "ridges": ridges, "ranks": ranks, "tile": store.plan.tile},
        "machine": machine(),
        "store": {"url": url, "build_s": build_s, "dense_load_s": load_s, "mean_diag": mean_diag},
        "throughput": rates,
        "rows": rows,
        "goals": goals,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(
        f"\nN={args.n} d={args.d} latent={args.latent} C={args.rhs} {args.dtype} "
        f"tol={args.tol:g} max_iter={args.max_iter}"
    )
    print_table(result["rows"])
    t = result["throughput"]
    gb = {k: v / 1e9 for k, v in t.items() if k.endswith("_per_s")}
    print(
        f"\nstored product, files dropped from the page cache: {gb['cold_product_bytes_per_s']:.2f}"
        f" GB/s vs raw read of the same files {gb['cold_raw_bytes_per_s']:.2f} GB/s; cached: "
        f"{gb['warm_product_bytes_per_s']:.2f} vs {gb['warm_raw_bytes_per_s']:.2f} GB/s "
        f"({t['stored_bytes'] / 1e6:.0f} MB stored, read_ahead {t['read_ahead']})"
    )
    print_goals(result["goals"])
    write_json(args.out, result)


if __name__ == "__main__":
    main()
