"""Kernel-tile throughput: the FC depth-3 ReLU NTK against its matmul floor (and Neural Tangents).

For each input dimension d and dtype, times one n x n NTK tile from ``tile_function`` and the
floor, a jitted ``jnp.dot(x1, x2.T, precision=HIGHEST)`` of the same shapes and dtype, in the same
process with interleaved repeats (alternating order) so that machine noise hits both. Reports the
median seconds per tile, entries per second and the ratio tile / floor, and checks the goals:
ratio <= 1.5 at d = 784 and <= 1.2 at d = 3072, in float32.

Neural Tangents' ``kernel_fn`` on the same tile is timed through the oracle environment
(``../shared/tools/nt-oracle.sh``, jax 0.5.3) by ``benchmarks/nt_tile_timing.py``, which prints
JSON; if the oracle script is missing or a run fails, that column is skipped with a note.

    .venv/bin/python benchmarks/kernel_throughput.py                   # the full default run
    .venv/bin/python benchmarks/kernel_throughput.py --n 1024 --dims 784 --repeats 3 --no-nt

Both functions are called with numpy inputs, as ``tile_function``'s callers do (so each timing
includes the same host-to-device hand-over). Results: ``benchmarks/results/kernel_throughput.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from results_io import RESULTS, write_json

from ntk_scale import FullyConnected
from ntk_scale.kernels import tile_function

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "benchmarks" / "nt_tile_timing.py"
DEFAULT_ORACLE = REPO.parent / "shared" / "tools" / "nt-oracle.sh"
DEFAULT_OUT = RESULTS / "kernel_throughput.json"

SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)
#: (d, dtype) -> the largest acceptable tile / floor ratio.
GOALS = {(784, "float32"): 1.5, (3072, "float32"): 1.2}


def make_inputs(n: int, d: int, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two distinct (n, d) standard-normal blocks. Keep in step with nt_tile_timing.py."""
    rng = np.random.default_rng([seed, d])
    x1 = rng.standard_normal((n, d)).astype(dtype)
    x2 = rng.standard_normal((n, d)).astype(dtype)
    return x1, x2


@jax.jit
def _floor(x1: jax.Array, x2: jax.Array) -> jax.Array:
    return jnp.dot(x1, x2.T, precision=jax.lax.Precision.HIGHEST)


def floor_function(dtype: str) -> Callable[[np.ndarray, np.ndarray], jax.Array]:
    """The matmul floor, called the way ``tile_function``'s wrapper calls its kernel."""
    np_dtype = np.dtype(dtype)

    def call(x1: np.ndarray, x2: np.ndarray) -> jax.Array:
        with jax.enable_x64(True):
            return _floor(np.asarray(x1, dtype=np_dtype), np.asarray(x2, dtype=np_dtype))

    return call


def time_interleaved(
    fns: dict[str, Callable[[], jax.Array]], repeats: int, label: str
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Compile + warm each function, then ``repeats`` rounds timing each once, alternating order."""
    compile_s = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn().block_until_ready()
        compile_s[name] = time.perf_counter() - t0
    for fn in fns.values():  # one untimed warm run each
        fn().block_until_ready()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]().block_until_ready()
            times[name].append(time.perf_counter() - t0)
        done = ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items())
        print(f"  {label} repeat {r + 1}/{repeats}: {done}", file=sys.stderr, flush=True)
    return times, compile_s


def bench_ntk_scale(n: int, d: int, dtype: str, repeats: int, seed: int) -> dict:
    x1, x2 = make_inputs(n, d, dtype, seed)
    tile = tile_function(SPEC, "ntk", dtype)
    floor = floor_function(dtype)
    times, compile_s = time_interleaved(
        {"tile": lambda: tile(x1, x2), "floor": lambda: floor(x1, x2)}, repeats, f"d={d} {dtype}"
    )
    out = np.asarray(tile(x1, x2))
    assert out.shape == (n, n) and out.dtype == np.dtype(dtype), (out.shape, out.dtype)
    finite = bool(np.isfinite(out).all())
    del out
    tile_s = statistics.median(times["tile"])
    floor_s = statistics.median(times["floor"])
    ratio = tile_s / floor_s
    goal = GOALS.get((d, dtype))
    return {
        "d": d,
        "dtype": dtype,
        "tile_s": tile_s,
        "floor_s": floor_s,
        "ratio": ratio,
        "entries_per_s": n * n / tile_s,
        "goal_ratio": goal,
        "goal_met": None if goal is None else bool(ratio <= goal),
        "tile_times_s": times["tile"],
        "floor_times_s": times["floor"],
        "compile_s": compile_s,
        "finite": finite,
    }


def bench_nt(
    oracle: Path, n: int, d: int, repeats: int, seed: int, timeout: float
) -> tuple[dict | None, str | None]:
    """(result, None) from the oracle helper, or (None, why it was skipped)."""
    if not oracle.is_file():
        return None, f"oracle script {oracle} not found; Neural Tangents column skipped"
    cmd = ["bash", str(oracle), str(HELPER), "--n", str(n), "--d", str(d)]
    cmd += ["--dtype", "float32", "--repeats", str(repeats), "--seed", str(seed)]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return None, f"Neural Tangents at d={d} took over {timeout:.0f} s; skipped"
    except OSError as err:
        return None, f"could not run the oracle ({err}); skipped"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line), None
            except json.JSONDecodeError:
                break
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return None, f"Neural Tangents at d={d} failed (exit {proc.returncode}): {tail}"


def machine_info() -> dict:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "jaxlib_version": _jaxlib_version(),
        "numpy_version": np.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(dev) for dev in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "git_commit": commit,
    }


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def _goal_cell(row: dict) -> str:
    if row["goal_ratio"] is None:
        return "-"
    verdict = "met" if row["goal_met"] else "MISSED"
    return f"{verdict} (<= {row['goal_ratio']}x)"


def print_table(rows: list[dict], nt_rows: list[dict], n: int) -> None:
    print(f"\nFC depth-3 ReLU NTK, {n} x {n} tile (median s; floor = jitted HIGHEST matmul)")
    head = f"{'d':>6} {'dtype':>8} {'tile s':>9} {'floor s':>9} {'ratio':>7} {'entries/s':>10}"
    head += "  goal"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['d']:>6} {r['dtype']:>8} {r['tile_s']:>9.4f} {r['floor_s']:>9.4f} "
            f"{r['ratio']:>6.2f}x {r['entries_per_s']:>10.3g}  {_goal_cell(r)}"
        )
    if nt_rows:
        print(
            "\nNeural Tangents kernel_fn (oracle venv, jax "
            f"{nt_rows[0]['jax_version']}; floor timed in that process)"
        )
        head = (
            f"{'d':>6} {'dtype':>8} {'NT s':>9} {'floor s':>9} {'ratio':>7} "
            f"{'entries/s':>10}  ntk_scale speed-up"
        )
        print(head)
        print("-" * len(head))
        ours = {(r["d"], r["dtype"]): r for r in rows}
        for r in nt_rows:
            mine = ours.get((r["d"], r["dtype"]))
            speedup = f"{r['tile_s'] / mine['tile_s']:.1f}x" if mine else "-"
            print(
                f"{r['d']:>6} {r['dtype']:>8} {r['tile_s']:>9.4f} {r['floor_s']:>9.4f} "
                f"{r['ratio']:>6.2f}x {r['entries_per_s']:>10.3g}  {speedup}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="tile side (default 4096)")
    ap.add_argument("--dims", type=int, nargs="+", default=[784, 3072], help="input dimensions")
    ap.add_argument(
        "--dtypes", nargs="+", choices=("float32", "float64"), default=["float32", "float64"]
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats after warm-up")
    ap.add_argument("--seed", type=int, default=0, help="numpy default_rng seed")
    ap.add_argument("--no-nt", action="store_true", help="skip the Neural Tangents column")
    ap.add_argument(
        "--nt-dims", type=int, nargs="+", default=None, help="dims for NT (default: --dims)"
    )
    ap.add_argument(
        "--nt-timeout", type=float, default=1200.0, help="seconds per NT run before skipping it"
    )
    ap.add_argument(
        "--oracle",
        type=Path,
        default=Path(os.environ.get("NT_ORACLE_SCRIPT", DEFAULT_ORACLE)),
        help="path to nt-oracle.sh",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result path")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    info = machine_info()
    print(
        f"jax {info['jax_version']} on {info['jax_backend']}, {info['cpu_count']} CPUs "
        f"({info['cpu_model']}), load {info['loadavg_at_start']}",
        file=sys.stderr,
    )

    rows = []
    for d in args.dims:
        for dtype in args.dtypes:
            rows.append(bench_ntk_scale(args.n, d, dtype, args.repeats, args.seed))

    nt_rows: list[dict] = []
    notes: list[str] = []
    if args.no_nt:
        notes.append("Neural Tangents column skipped (--no-nt)")
    else:
        for d in args.nt_dims or args.dims:
            print(f"  Neural Tangents d={d} float32 ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            res, note = bench_nt(args.oracle, args.n, d, args.repeats, args.seed, args.nt_timeout)
            if res is not None:
                res["wall_s"] = time.perf_counter() - t0
                nt_rows.append(res)
            if note is not None:
                notes.append(note)
                if not args.oracle.is_file():
                    break

    print_table(rows, nt_rows, args.n)
    print()
    for r in rows:
        if r["goal_ratio"] is not None:
            verdict = "MET" if r["goal_met"] else "NOT MET"
            print(
                f"goal d={r['d']} {r['dtype']}: ratio {r['ratio']:.2f}x "
                f"<= {r['goal_ratio']}x -> {verdict}"
            )
    for r in rows:
        if not r["finite"]:
            print(f"WARNING: non-finite values in the d={r['d']} {r['dtype']} tile")
    for note in notes:
        print(f"note: {note}")

    total_s = time.perf_counter() - started
    result = {
        "benchmark": "kernel_throughput",
        "spec": SPEC.to_dict(),
        "kind": "ntk",
        "n": args.n,
        "dims": args.dims,
        "dtypes": args.dtypes,
        "repeats": args.repeats,
        "seed": args.seed,
        "statistic": "median over repeats, after a compile call and a warm run",
        "floor": "jax.jit(jnp.dot(x1, x2.T, precision=HIGHEST)), same shapes and dtype",
        "goals": [{"d": d, "dtype": t, "max_ratio": g} for (d, t), g in GOALS.items()],
        "results": rows,
        "neural_tangents": nt_rows,
        "notes": notes,
        "machine": info,
        "total_wall_s": total_s,
    }
    write_json(args.out, result)
    print(f"({total_s:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
