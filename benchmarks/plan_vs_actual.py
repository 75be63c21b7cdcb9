"""`ntk-scale plan`'s estimate beside the measured Gram: a write-bound and a compute-bound case.

    python benchmarks/plan_vs_actual.py                 # N=60,000 d=25 and N=12,288 d=3,072
    python benchmarks/plan_vs_actual.py --quick         # smaller cases, for a smoke run

Each case: the plan (one tile timed here, the write rate measured on the store's own disk) and
then the real Gram with the same settings on 2 workers of an already-started pool (the
persistent pool is started and compiled by a 3-tile Gram first, as a CLI run's first stage would;
that start is reported apart). Prints a table, writes benchmarks/results/plan_vs_actual.json.
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

from ntk_scale import FullyConnected, stages
from ntk_scale.options import GramOptions, RunOptions
from ntk_scale.sizing import plan_gram

SPEC = FullyConnected(depth=3, activation="relu", W_std=2**0.5, b_std=0.0)
RUN = RunOptions(workers=2, threads_per_worker=1, progress=False, wait_seconds=0.5)


def case(n: int, d: int, tile: int, directory: Path) -> dict:
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    start = time.perf_counter()
    stages.gram(x[: 2 * tile], SPEC, str(directory / "warm.zarr"), GramOptions(tile=tile), RUN)
    warm = time.perf_counter() - start
    shutil.rmtree(directory / "warm.zarr")
    plan = plan_gram(n, d, SPEC, "ntk", "float32", tile, 2, True, store_url=str(directory))
    os.sync()
    start = time.perf_counter()
    report = stages.gram(x, SPEC, str(directory / "gram.zarr"), GramOptions(tile=tile), RUN)
    os.sync()  # the estimate counts the bytes on the disk, not in the page cache
    actual = time.perf_counter() - start
    shutil.rmtree(directory / "gram.zarr")
    busy = {}
    for r in report.records:  # what the workers spent, per worker
        c, w = busy.get(r["pid"], (0.0, 0.0))
        busy[r["pid"]] = (c + r["compute_s"], w + r["write_s"])
    return {
        "n": n, "d": d, "tile": tile, "tiles": report.computed,
        "bytes": plan.bytes_on_disk, "seconds_per_tile": plan.seconds_per_tile,
        "compute_estimate_s": plan.compute_seconds, "write_rate": plan.write_bytes_per_s,
        "write_estimate_s": plan.write_seconds, "bound": plan.bound,
        "estimate_s": plan.estimated_seconds, "actual_s": actual,
        "actual_over_estimate": actual / plan.estimated_seconds, "pool_warm_s": warm,
        "tile_write_s": plan.tile_write_seconds,
        "worker_compute_s": max(c for c, _ in busy.values()),
        "worker_write_s": max(w for _, w in busy.values()),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    a = ap.parse_args()
    directory = Path(a.dir or tempfile.mkdtemp(prefix="ntk-plan-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    full = [(60000, 25, 2048), (12288, 3072, 2048)]
    cases = [(8192, 25, 1024), (4096, 1024, 1024)] if a.quick else full
    rows = [case(n, d, t, directory) for n, d, t in cases]
    print(f"plan vs actual: FC-3 ReLU NTK float32, 2 workers, {os.cpu_count()} cores")
    head = f"{'N':>7} {'d':>5} {'tiles':>6} {'GB':>6} {'s/tile':>7} {'compute est':>11} "
    print(head + f"{'write est':>10} {'bound':>8} {'estimate':>9} {'actual':>8} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['n']:>7} {r['d']:>5} {r['tiles']:>6} {r['bytes'] / 1e9:>6.2f} "
            f"{r['seconds_per_tile']:>7.3f} {r['compute_estimate_s']:>10.1f}s "
            f"{r['write_estimate_s']:>9.1f}s {r['bound']:>8} "
            f"{r['estimate_s']:>8.1f}s {r['actual_s']:>7.1f}s {r['actual_over_estimate']:>6.2f}"
        )
    for r in rows:
        print(
            f"  N={r['n']}: busiest worker computed {r['worker_compute_s']:.1f} s and wrote "
            f"{r['worker_write_s']:.1f} s (a write thread overlapping compute on its core)"
        )
    RESULTS.mkdir(exist_ok=True)
    name = "plan_vs_actual_quick.json" if a.quick else "plan_vs_actual.json"
    write_json(RESULTS / name, {"cases": rows, "machine": machine()})
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
