"""`ntk-scale plan`'s estimate beside the measured Gram: a write-bound and a compute-bound case.

    python benchmarks/plan_vs_actual.py                 # N=60,000 d=25 and N=12,288 d=3,072
    python benchmarks/plan_vs_actual.py --quick         # smaller cases, for a smoke run

Each case: the plan (one tile timed as a worker spends it, with the worker's start: its imports
and first compile; the write rate measured on the store's own disk), then the Gram as a user
runs it, ``ntk-scale gram`` in a new process that starts its own local Ray, timed from launch to
exit (the wall time a user waits for), and its own "time:" line (Ray start, store, pool start,
tiles). Ratios: wall / plan's wall estimate (start-up + tiles), and tiles / plan's tiles
estimate. Prints a table, writes benchmarks/results/plan_vs_actual.json.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
from results_io import RESULTS, machine, write_json

from ntk_scale import FullyConnected
from ntk_scale.sizing import plan_gram

SPEC = FullyConnected(depth=3, activation="relu", W_std=2**0.5, b_std=0.0)


def case(n: int, d: int, tile: int, directory: Path) -> dict:
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    np.save(directory / "x.npy", x)
    plan = plan_gram(n, d, SPEC, "ntk", "float32", tile, 2, True, store_url=str(directory))
    os.sync()
    store = directory / "gram.zarr"
    argv = [sys.executable, "-m", "ntk_scale.cli", "gram", "--x", str(directory / "x.npy"),
            "--store", str(store), "--depth", "3", "--W-std", str(2**0.5), "--b-std", "0",
            "--dtype", "float32", "--tile", str(tile), "--workers", "2",
            "--threads-per-worker", "1", "--no-progress"]  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
    os.sync()  # the estimate counts the bytes on the disk, not in the page cache
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"ntk-scale gram exited {proc.returncode}: {proc.stderr[-2000:]}")
    phases = {k: float(v) for k, v in re.findall(r"(Ray start|store|pool start|tiles) "
                                                r"([0-9.]+) s", proc.stdout)}  # fmt: skip
    shutil.rmtree(store)
    return {
        "n": n, "d": d, "tile": tile, "tiles": plan.tiles,
        "bytes": plan.bytes_on_disk, "seconds_per_tile": plan.seconds_per_tile,
        "compute_estimate_s": plan.compute_seconds, "write_rate": plan.write_bytes_per_s,
        "write_estimate_s": plan.write_seconds, "bound": plan.bound,
        "estimate_s": plan.estimated_seconds, "startup_estimate": dict(plan.startup),
        "stop_estimate_s": plan.stop_seconds,
        "wall_estimate_s": plan.wall_seconds, "wall_s": wall, "phases_s": phases,
        "wall_over_estimate": wall / plan.wall_seconds,
        "tiles_over_estimate": phases.get("tiles", float("nan")) / plan.estimated_seconds,
        "tile_write_s": plan.tile_write_seconds, "summary": proc.stdout.strip(),
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
    print(f"plan vs actual: FC-3 ReLU NTK float32, 2 workers, {os.cpu_count()} cores; "
          "`ntk-scale gram` timed from launch to exit")
    head = f"{'N':>7} {'d':>5} {'tiles':>6} {'GB':>6} {'bound':>8} {'start-up est':>12} "
    print(head + f"{'tiles est':>9} {'wall est':>9} {'wall':>7} {'ratio':>6} {'tiles':>6} "
          f"{'ratio':>6}")  # fmt: skip
    for r in rows:
        print(
            f"{r['n']:>7} {r['d']:>5} {r['tiles']:>6} {r['bytes'] / 1e9:>6.2f} {r['bound']:>8} "
            f"{sum(r['startup_estimate'].values()):>11.1f}s {r['estimate_s']:>8.1f}s "
            f"{r['wall_estimate_s']:>8.1f}s {r['wall_s']:>6.1f}s {r['wall_over_estimate']:>6.2f} "
            f"{r['phases_s'].get('tiles', float('nan')):>5.1f}s {r['tiles_over_estimate']:>6.2f}"
        )
    for r in rows:
        est = ", ".join(f"{k} {v:.1f} s" for k, v in r["startup_estimate"].items())
        got = ", ".join(f"{k} {v:.1f} s" for k, v in r["phases_s"].items())
        print(f"  N={r['n']}: start-up estimated {est}, Ray's stop {r['stop_estimate_s']:.1f} s; "
              f"measured {got}")
    RESULTS.mkdir(exist_ok=True)
    name = "plan_vs_actual_quick.json" if a.quick else "plan_vs_actual.json"
    write_json(RESULTS / name, {"cases": rows, "machine": machine()})
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
