"""A million-sample NTK regression on one device, matrix-free: no Gram matrix stored anywhere.

    python benchmarks/gpu_million.py                          # N = 10^6, d = 32, 10 outputs
    python benchmarks/gpu_million.py --n 20000 --out benchmarks/results/gpu_million_cpu_smoke.json

Synthetic teacher-student data (a random width-256 two-hidden-layer ReLU network, its outputs
standardised, plus Gaussian noise), the FC-3 ReLU NTK, ridge λ = --ridge · mean(diag K),
an RPCholesky Nyström preconditioner of rank --rank, and block PCG on an in-process
MatrixFreeOperator (float32 tiles at "highest" precision, float64 products) on the default JAX
device (the GPU where there is one). Reports the device, seconds per PCG iteration, iterations to
--tol, total time, peak device memory (jax memory_stats, else the host's peak RSS), the float32
product's error against float64, and the held-out test error.

Made to run as one call of at most 10 minutes: a pilot product at --pilot-n predicts the time of
a product at N by the N^2 law; when the whole regression (setup + --expect-iter iterations) would
not fit in --time-budget seconds, it runs at the largest smaller N that fits and extrapolates to N
by N^2 per iteration (setup by N), and says so. PCG is also stopped when the budget runs out.
Writes benchmarks/results/gpu_million_<device kind>.json (or --out).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import argparse
import resource
import time
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")  # never TF32 for float32 matmuls

from results_io import RESULTS, machine, write_json

from ntk_scale import FullyConnected
from ntk_scale.linalg import nystrom, solve_pcg
from ntk_scale.linalg.matrixfree import MatrixFreeOperator, precision_report
from ntk_scale.roles import ProductWorker

SPEC = FullyConnected(depth=3, activation="relu", W_std=2**0.5, b_std=0.0)


class OutOfTime(Exception):
    """Raised from the PCG callback when the time budget is spent."""


def teacher_student(
    n: int, n_test: int, d: int, outputs: int, noise: float, seed: int
) -> tuple[np.ndarray, ...]:
    """X (n, d), Y (n, outputs) noisy, X_test, Y_test noisy, F_test (the noiseless teacher)."""
    rng = np.random.default_rng(seed)
    width = 256
    W1 = rng.standard_normal((d, width)).astype(np.float32) * np.sqrt(2.0 / d)
    W2 = rng.standard_normal((width, width)).astype(np.float32) * np.sqrt(2.0 / width)
    W3 = rng.standard_normal((width, outputs)).astype(np.float32) / np.sqrt(width)
    X = rng.standard_normal((n + n_test, d)).astype(np.float32)
    F = np.empty((n + n_test, outputs))
    for i in range(0, n + n_test, 65536):  # bounded temporaries
        h = np.maximum(X[i : i + 65536] @ W1, 0)
        F[i : i + 65536] = np.maximum(h @ W2, 0) @ W3
    F = (F - F[:n].mean(0)) / F[:n].std(0)
    Y = F + noise * rng.standard_normal(F.shape)
    return X[:n], Y[:n], X[n:], Y[n:], F[n:]


def predict(X: np.ndarray, alpha: np.ndarray, x_test: np.ndarray, tile: int) -> np.ndarray:
    """K(x_test, X) @ alpha, (m, C) float64: predict's own fused path, in this process."""
    worker = ProductWorker(SPEC, X, "ntk", "float32", tile, P=alpha)
    rows = [x_test[i : i + tile] for i in range(0, len(x_test), tile)]
    return np.concatenate([worker.product(r, alpha.shape[1]) for r in rows])


def product_seconds(X: np.ndarray, c: int, tile: int) -> float:
    """Seconds of one K @ P on X (after a warm-up product that compiles)."""
    op = MatrixFreeOperator(SPEC, X, tile=tile, local=True)
    P = np.random.default_rng(0).standard_normal((len(X), c))
    op.matmat(P)
    start = time.perf_counter()
    op.matmat(P)
    return time.perf_counter() - start


def choose_n(a: argparse.Namespace, X_pilot: np.ndarray, remaining: float) -> tuple[int, dict]:
    """The N to run: a.n if setup + (expect_iter + 2) products fit, else the largest that does."""
    t_pilot = product_seconds(X_pilot, a.outputs, a.tile)
    per_entry = t_pilot / len(X_pilot) ** 2
    predicted = (a.expect_iter + 2) * per_entry * a.n**2
    fits = predicted <= a.budget_fraction * remaining
    n_run = a.n if fits else int(a.n * np.sqrt(a.budget_fraction * remaining / predicted))
    n_run = a.n if n_run >= a.n else max(n_run // a.tile * a.tile, a.tile)  # whole tiles
    pilot = {
        "n": len(X_pilot),
        "product_s": t_pilot,
        "predicted_product_s_at_n": per_entry * a.n**2,
        "predicted_pcg_s_at_n": predicted,
    }
    return n_run, pilot


def peak_memory() -> dict:
    """Peak device bytes in use (where JAX reports it) and the host's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "device_bytes_limit": stats.get("bytes_limit"),
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def regress(a: argparse.Namespace, data: tuple, deadline: float) -> dict:
    """Preconditioner, PCG (stopped at the deadline), predictions and errors at N = len(X)."""
    X, Y, X_test, Y_test, F_test = data
    t0 = time.perf_counter()
    op = MatrixFreeOperator(SPEC, X, tile=a.tile, local=True)
    lam = a.ridge * float(np.mean(op.diag()))
    M = nystrom(op, min(a.rank, len(X)), lam, pivots="rpcholesky", seed=a.seed, block=a.rpc_block)
    t_setup = time.perf_counter() - t0
    states = []

    def guard(state) -> None:
        states.append(state)
        if time.perf_counter() > deadline:
            raise OutOfTime

    t1 = time.perf_counter()
    try:
        res = solve_pcg(op, Y, lam, M, tol=a.tol, max_iter=a.max_iter, callback=guard)
        x, iters, conv, last = res.x, res.iterations, bool(res.converged.all()), res.residuals[-1]
    except OutOfTime:
        st = states[-1]
        x, iters, conv, last = st.x, st.iteration, False, st.residuals[-1]
    t_pcg = time.perf_counter() - t1
    if not conv and iters > 1:  # the residual's geometric rate so far, continued to tol
        rate = np.log(np.max(last)) / iters
        needed = int(np.ceil(np.log(a.tol) / rate)) if rate < 0 else None
    else:
        needed = iters
    t2 = time.perf_counter()
    pred = predict(X, x, X_test, a.tile)
    t_predict = time.perf_counter() - t2

    def rel_mse(p, y):
        return float(np.sum((p - y) ** 2) / np.sum((y - y.mean(0)) ** 2))

    return {
        "n": len(X),
        "lambda": lam,
        "preconditioner": {"name": M.name, "rank": M.rank, "columns_read": M.columns_read},
        "setup_s": t_setup,
        "pcg_s": t_pcg,
        "iterations": iters,
        "seconds_per_iteration": t_pcg / max(iters, 1),
        "converged": conv,
        "iterations_to_tol_estimated": needed,
        "final_relative_residual_max": float(np.max(last)),
        "predict_s": t_predict,
        "test_relative_mse_vs_noisy": rel_mse(pred, Y_test),
        "test_relative_mse_vs_teacher": rel_mse(pred, F_test),
        "noise_floor_relative_mse": float(a.noise**2 / np.mean(Y_test.var(0))),
    }


def extrapolate(run: dict, n: int) -> dict:
    """Times at n from a run at run['n']: products by N^2, setup by N, the same iterations
    (those estimated to reach tol when PCG was stopped by the budget)."""
    s = n / run["n"]
    per_iter = run["seconds_per_iteration"] * s**2
    iters = run["iterations_to_tol_estimated"] or run["iterations"]
    return {
        "n": n,
        "seconds_per_iteration": per_iter,
        "setup_s": run["setup_s"] * s,
        "iterations": iters,
        "pcg_s": per_iter * iters,
        "total_s": run["setup_s"] * s + per_iter * iters,
        "assumes": "iterations as at the smaller N (they grow with N: about N^0.4 from 4k to 12k)",
    }


def parse() -> argparse.Namespace:
    on_gpu = jax.devices()[0].platform == "gpu"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="training samples")
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--outputs", type=int, default=10)
    ap.add_argument("--n-test", type=int, default=10_000)
    ap.add_argument("--noise", type=float, default=0.1, help="label noise std (targets std 1)")
    ap.add_argument("--ridge", type=float, default=1e-3, help="λ = ridge · mean(diag K)")
    ap.add_argument("--rank", type=int, default=1000, help="RPCholesky Nyström rank")
    ap.add_argument("--rpc-block", type=int, default=100, help="RPCholesky columns per round")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=500)
    ap.add_argument("--tile", type=int, default=8192 if on_gpu else 2048)
    ap.add_argument("--time-budget", type=float, default=480.0, help="seconds, whole script")
    ap.add_argument("--expect-iter", type=int, default=150, help="iterations assumed to plan N")
    ap.add_argument("--budget-fraction", type=float, default=0.7, help="of it for PCG, planned")
    ap.add_argument("--pilot-n", type=int, default=65536 if on_gpu else 8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default results/gpu_million_<kind>)")
    return ap.parse_args()


def main() -> None:
    start = time.perf_counter()
    a = parse()
    dev = jax.devices()[0]
    a.tile = min(a.tile, a.n)
    print(f"device: {dev.platform} {dev.device_kind} ({len(jax.devices())} visible); N={a.n:,}")
    data = teacher_student(a.n, a.n_test, a.d, a.outputs, a.noise, a.seed)
    t_data = time.perf_counter() - start
    remaining = a.time_budget - (time.perf_counter() - start)
    n_run, pilot = choose_n(a, data[0][: min(a.pilot_n, a.n)], remaining)
    print(
        f"pilot: 1 product at N={pilot['n']:,} took {pilot['product_s']:.3f} s; predicted "
        f"{pilot['predicted_product_s_at_n']:.1f} s per product at N={a.n:,}"
    )
    if n_run < a.n:
        print(
            f"N={a.n:,} would not finish in the budget ({a.time_budget:.0f} s, "
            f"{a.expect_iter} iterations assumed): running N={n_run:,} and extrapolating by N^2"
        )
        data = tuple(arr[:n_run] for arr in data[:2]) + data[2:]
    P = np.random.default_rng(1).standard_normal((n_run, a.outputs))
    precision = precision_report(SPEC, data[0], P, tile=a.tile, row_blocks=1)._asdict()
    run = regress(a, data, deadline=start + a.time_budget)
    total = time.perf_counter() - start
    report = {
        "device": {"platform": dev.platform, "kind": dev.device_kind, "count": len(jax.devices())},
        "n_requested": a.n,
        "n_run": n_run,
        "extrapolated": n_run < a.n,
        "args": vars(a),
        "kernel": SPEC.to_dict(),
        "data_s": t_data,
        "pilot": pilot,
        "precision_float32_vs_float64": precision,
        "run": run,
        "total_s": total,
        "at_n_requested": extrapolate(run, a.n) if n_run < a.n else None,
        "memory": peak_memory(),
        "machine": machine(),
    }
    print_report(report)
    kind = dev.device_kind.lower().replace(" ", "_")
    out = Path(a.out) if a.out else RESULTS / f"gpu_million_{dev.platform}_{kind}.json"
    write_json(out, report)


def print_report(r: dict) -> None:
    run, mem, prec = r["run"], r["memory"], r["precision_float32_vs_float64"]
    dev = r["device"]
    peak = mem["device_peak_bytes"] or mem["host_peak_rss_bytes"]
    where = "device" if mem["device_peak_bytes"] else "host RSS"
    rows = [
        ("device", f"{dev['platform']} {dev['kind']}"),
        ("N run (requested)", f"{r['n_run']:,} ({r['n_requested']:,})"),
        ("d, outputs", f"{r['args']['d']}, {r['args']['outputs']}"),
        ("λ (ridge · mean diag K)", f"{run['lambda']:.3e}"),
        (
            "preconditioner",
            f"{run['preconditioner']['name']}, rank {run['preconditioner']['rank']}",
        ),
        ("setup (diag + RPCholesky + SVD)", f"{run['setup_s']:.1f} s"),
        ("seconds per PCG iteration", f"{run['seconds_per_iteration']:.3f} s"),
        (
            f"iterations to tol {r['args']['tol']:g}",
            f"{run['iterations']} (converged: {run['converged']}, "
            f"max residual {run['final_relative_residual_max']:.1e}"
            + ("" if run["converged"] else f"; ~{run['iterations_to_tol_estimated']} needed")
            + ")",
        ),
        ("PCG time", f"{run['pcg_s']:.1f} s"),
        ("total script time", f"{r['total_s']:.1f} s"),
        (f"peak memory ({where})", f"{peak / 2**30:.2f} GiB"),
        ("float32 vs float64 product (max rel)", f"{prec['max_rel']:.1e} on {prec['rows']} rows"),
        (
            "test rel. MSE vs teacher / noisy",
            (
                f"{run['test_relative_mse_vs_teacher']:.4f} / "
                f"{run['test_relative_mse_vs_noisy']:.4f} "
                f"(noise floor {run['noise_floor_relative_mse']:.4f})"
            ),
        ),
    ]
    ext = r["at_n_requested"]
    if ext:
        rows += [
            (
                f"EXTRAPOLATED to N={ext['n']:,}: s/iteration",
                f"{ext['seconds_per_iteration']:.1f} s",
            ),
            (f"EXTRAPOLATED total ({ext['iterations']} iterations)", f"{ext['total_s']:.0f} s"),
        ]
    print("\nMatrix-free NTK regression, FC-3 ReLU NTK, float32 tiles, float64 products")
    for name, value in rows:
        print(f"  {name:<40} {value}")


if __name__ == "__main__":
    main()
