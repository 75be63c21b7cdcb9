"""Matrix-free products K @ P: seconds per product against N (the N^2 law), beside the stored ones.

    python benchmarks/matrix_free.py                    # N = 3,125 ... 100,000, d = 32 and 784
    python benchmarks/matrix_free.py --max-n 25000      # a quick run
    python benchmarks/matrix_free.py --dims 32 --stored-max-n 0

For each d, a doubling series of N: one in-process MatrixFreeOperator (local mode: one process,
XLA's threads on all cores), FC-3 ReLU NTK, float32 tiles, float64 products, P of --c columns.
The default tile, 3125 = 100,000 / 32, makes every N of the default series a whole number of
tiles, so no padding bends the N^2 law.
Each size is timed over several products while a product is short, and over ONE product (its
compilation included, under 1 % of it) once a product takes longer than --single-above seconds.
t ∝ N^a is fitted by least squares on log t over the sizes N >= --fit-from. For N up to
--stored-max-n the same Gram is computed into a float32 store (2 Ray workers, one core each) and
a StoredOperator product is timed on it, in the same run; the store is then deleted. Its tiles are
read back from the page cache (the store was just written), so that is a lower bound on a read
from disk. Prints a table and writes benchmarks/results/matrix_free.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
from results_io import RESULTS, machine, write_json

from ntk_scale import FullyConnected
from ntk_scale.linalg.matrixfree import MatrixFreeOperator
from ntk_scale.linalg.stored import StoredOperator

SPEC = FullyConnected(depth=3, activation="relu", W_std=2**0.5, b_std=0.0)


def doubling(max_n: int, min_n: int) -> list[int]:
    """max_n, max_n / 2, ... down to >= min_n, ascending."""
    sizes = [max_n]
    while sizes[-1] // 2 >= min_n:
        sizes.append(sizes[-1] // 2)
    return sizes[::-1]


def time_products(op, P: np.ndarray, single_above: float, max_reps: int) -> tuple[float, int]:
    """Median seconds per product and the count timed. The first product is only a warm-up
    (compilation) unless it took over ``single_above`` seconds: then it is the measurement."""
    start = time.perf_counter()
    op.matmat(P)
    first = time.perf_counter() - start
    if first > single_above:
        return first, 1
    times = []
    for _ in range(max_reps):
        start = time.perf_counter()
        op.matmat(P)
        times.append(time.perf_counter() - start)
        if sum(times) > single_above:
            break
    return float(np.median(times)), len(times)


def stored_product(x: np.ndarray, P: np.ndarray, tile: int, directory: Path, reps: int) -> dict:
    """Compute the float32 store of K(x, x), then time StoredOperator products on it."""
    from ntk_scale import stages
    from ntk_scale.options import GramOptions, RunOptions

    url = directory / f"gram-{x.shape[0]}-{x.shape[1]}.zarr"
    opts = RunOptions(workers=2, threads_per_worker=1, progress=False, wait_seconds=0.5)
    start = time.perf_counter()
    stages.gram(x, SPEC, str(url), GramOptions(dtype="float32", tile=tile), opts)
    build = time.perf_counter() - start
    op = StoredOperator(str(url))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        op.matmat(P)
        times.append(time.perf_counter() - start)
    shutil.rmtree(url)
    return {"build_s": build, "product_s": float(np.median(times)), "bytes": op.stored_bytes}


def fit_exponent(ns: list[int], ts: list[float]) -> float | None:
    """a in t = c N^a by least squares on logs (None with fewer than two points)."""
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def run_dim(d: int, sizes: list[int], a: argparse.Namespace, directory: Path) -> dict:
    rng = np.random.default_rng(d)
    x_all = rng.standard_normal((sizes[-1], d)).astype(np.float32)
    rows = []
    for n in sizes:
        x, P = x_all[:n], rng.standard_normal((n, a.c))
        op = MatrixFreeOperator(SPEC, x, tile=a.tile, local=True)
        secs, reps = time_products(op, P, a.single_above, a.reps)
        row = {"n": n, "product_s": secs, "products_timed": reps, "entries_per_s": n * n / secs}
        if n <= a.stored_max_n:
            row["stored"] = stored_product(x, P, a.tile, directory, a.reps)
        rows.append(row)
        stored = row.get("stored", {}).get("product_s")
        print(
            f"  d={d:<4} N={n:>7,}  matrix-free {secs:9.3f} s ({reps}x)  "
            + (f"stored {stored:8.3f} s" if stored else "stored        -"),
            flush=True,
        )
    fit = [r for r in rows if r["n"] >= a.fit_from]
    return {
        "d": d,
        "rows": rows,
        "exponent": fit_exponent([r["n"] for r in fit], [r["product_s"] for r in fit]),
        "fit_from": a.fit_from,
    }


def print_table(results: list[dict], a: argparse.Namespace) -> None:
    print(
        f"\nMatrix-free K @ P, FC-3 ReLU NTK, float32 tiles ({a.tile}), P: N x {a.c} float64, "
        f"local mode (one process, XLA threads on {os.cpu_count()} cores)"
    )
    print(
        f"{'d':>5} {'N':>9} {'matrix-free s':>14} {'timed':>6} {'M entries/s':>12} "
        f"{'stored s':>9} {'store GB':>9} {'build s':>8}"
    )
    for res in results:
        for r in res["rows"]:
            s = r.get("stored")
            stored = (
                f"{s['product_s']:>9.3f} {s['bytes'] / 1e9:>9.2f} {s['build_s']:>8.1f}"
                if s
                else f"{'-':>9} {'-':>9} {'-':>8}"
            )
            print(
                f"{res['d']:>5} {r['n']:>9,} {r['product_s']:>14.3f} {r['products_timed']:>6} "
                f"{r['entries_per_s'] / 1e6:>12.1f} {stored}"
            )
        a_fit = res["exponent"]
        print(
            f"{res['d']:>5} fitted t ∝ N^a for N >= {res['fit_from']:,}: a = "
            + (f"{a_fit:.2f}" if a_fit is not None else "-")
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-n", type=int, default=100_000)
    ap.add_argument("--min-n", type=int, default=3_125)
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 784])
    ap.add_argument("--c", type=int, default=10, help="columns of P")
    ap.add_argument("--tile", type=int, default=3125, help="3125: whole tiles at 100,000 / 2^k")
    ap.add_argument("--stored-max-n", type=int, default=25_000, help="0: no stored runs")
    ap.add_argument("--reps", type=int, default=3, help="products timed per size, at most")
    ap.add_argument("--single-above", type=float, default=10.0, help="seconds: time 1 product")
    ap.add_argument("--fit-from", type=int, default=12_500)
    ap.add_argument("--dir", default=None, help="scratch directory for stores (default: temp)")
    a = ap.parse_args()
    directory = Path(a.dir or tempfile.mkdtemp(prefix="ntk-matrix-free-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    sizes = doubling(a.max_n, a.min_n)
    load_before, start = os.getloadavg(), time.perf_counter()
    results = [run_dim(d, sizes, a, directory) for d in a.dims]
    wall = time.perf_counter() - start
    print_table(results, a)
    print(
        f"total wall time {wall:.0f} s; load average before/after "
        f"{load_before[0]:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    RESULTS.mkdir(exist_ok=True)
    out = {
        "kernel": SPEC.to_dict(),
        "kind": "ntk",
        "dtype": "float32",
        "tile": a.tile,
        "c": a.c,
        "mode": "local: one process, XLA's own threads on all cores",
        "single_above_s": a.single_above,
        "stored": "float32 store, 2 Ray workers; products read it from the page cache",
        "results": results,
        "wall_s": wall,
        "machine": machine(load_average_before_after=[load_before[0], os.getloadavg()[0]]),
    }
    write_json(RESULTS / "matrix_free.json", out)
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
