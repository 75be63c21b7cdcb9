"""Myrtle-5 / 7 / 10 NTK+NNGP kernels on 32x32x3 images: ntk_scale against Neural Tangents.

Both libraries compute the same pairs of the same images (numpy-generated, saved once) in the
same dtype on this machine, each in a child process of its own (so that each child's peak
memory, ``ru_maxrss``, is the memory of a worker computing these kernels):

* Neural Tangents 0.6.5 (``kernel_fn(x1, x2, ("nngp", "ntk"))``, through the oracle venv
  ``../shared/tools/nt-oracle.sh``), at blocks of b x b images for each b in --nt-blocks; the
  fastest per entry is its figure, as the brief asks. One warm-up call (compilation) first.
* ntk_scale's whole Gram engine (``stages.gram``, one pinned Ray worker per core, the Zarr
  store) on N = --gram-n images: seconds per distinct entry of a warm run.
* ntk_scale (``Compiled.tile``) on the same b x b blocks, NTK and NNGP (one call each: its
  NTK pass carries the NNGP along in the same complex array, and the NNGP call is the cheap
  real half), and per pair at tile scale (the images' self passes already done, as in a
  2048-row tile, where they are 2 x 2048 of 2048² pairs). Unpinned, and pinned to one core (one
  worker's view: workers are pinned to their cores).

Values are compared with Neural Tangents' float64 kernel of the same pairs (bounds 1e-8 in
float64, 1e-4 in float32). Prints a table and writes benchmarks/results/conv_kernels.json.

    .venv/bin/python benchmarks/conv_kernels.py                    # the full run (~15 min)
    .venv/bin/python benchmarks/conv_kernels.py --depths 5 --dtypes float32 --nt-blocks 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORACLE = REPO.parent / "shared" / "tools" / "nt-oracle.sh"
BOUND = {"float64": 1e-8, "float32": 1e-4}


def _myrtle_nt(stax, depth):
    """The Myrtle network of Neural Tangents' Myrtle notebook."""
    blocks = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}[depth]
    w = 2**0.5

    def conv():
        return [stax.Conv(1, (3, 3), W_std=w, b_std=0.0, padding="SAME"), stax.Relu()]

    pool = stax.AvgPool((2, 2), strides=(2, 2))
    layers = conv() * blocks[0] + [pool] + conv() * blocks[1] + [pool] + conv() * blocks[2]
    return stax.serial(*layers, pool, pool, pool, stax.Flatten(), stax.Dense(10, w, 0.0))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_nt(data: str, depth: int, dtype: str, block: int) -> dict:
    import jax

    jax.config.update("jax_enable_x64", dtype == "float64")
    import numpy as np
    from neural_tangents import stax

    with np.load(data) as f:
        x1, x2 = f["x1"][:block].astype(dtype), f["x2"][:block].astype(dtype)
    _, _, kernel_fn = _myrtle_nt(stax, depth)
    fn = jax.jit(kernel_fn, static_argnames="get")
    jax.block_until_ready(fn(x1, x2, ("nngp", "ntk")))
    start = time.perf_counter()
    k = jax.block_until_ready(fn(x1, x2, ("nngp", "ntk")))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "entries": block * block, "peak_mb": _peak_mb(),
            "ntk": np.asarray(k.ntk, np.float64).tolist(),
            "nngp": np.asarray(k.nngp, np.float64).tolist()}  # fmt: skip


def child_ours(data: str, depth: int, dtype: str, block: int) -> dict:
    import numpy as np

    from ntk_scale import Myrtle
    from ntk_scale.kernels.network import Compiled, chunk_shape

    with np.load(data) as f:
        x1, x2 = f["x1"][:block].astype(dtype), f["x2"][:block].astype(dtype)
    spec = Myrtle(depth)
    out = {"chunk": chunk_shape(spec, (32, 32, 3), "ntk", dtype, block, block)}
    for kind in ("ntk", "nngp"):
        c = Compiled(spec, (32, 32, 3), kind, dtype)
        c.tile(x1, x2)  # compiles every segment for these chunk shapes
        c._seen.clear()  # the timed call computes the images' self passes again
        start = time.perf_counter()
        k = c.tile(x1, x2)
        out[f"{kind}_seconds"] = time.perf_counter() - start
        out[kind] = k.tolist()
        s1, s2 = c.self_stats(x1), c.self_stats(x2)
        start = time.perf_counter()
        c.tile(x1, x2, s1, s2)
        out[f"{kind}_pair_seconds"] = (time.perf_counter() - start) / block**2
    out.update(entries=block * block, peak_mb=_peak_mb())
    return out


def system_gram(depth: int, dtype: str, n: int, tile: int, workers: int) -> dict:
    """A Myrtle Gram through the whole system (stages.gram: tiles on pinned Ray workers, the
    store): seconds per distinct kernel entry, the pool warm and every tile shape compiled by a
    first run, so the timed run is what a long Gram pays per entry."""
    import numpy as np

    from ntk_scale import Myrtle, stages
    from ntk_scale.options import GramOptions, RunOptions

    x = np.random.default_rng(depth).standard_normal((n, 32, 32, 3))
    run, where = RunOptions(workers=workers, progress=False), tempfile.mkdtemp(prefix="myrtle-")
    opts = GramOptions(dtype=dtype, tile=tile)
    stages.gram(x[: tile + 1], Myrtle(depth), f"{where}/warm.zarr", opts, run)
    start = time.perf_counter()
    report = stages.gram(x, Myrtle(depth), f"{where}/gram.zarr", opts, run)
    seconds = time.perf_counter() - start
    pairs = n * (n + 1) // 2
    return {"n": n, "tile": tile, "workers": workers, "tiles": report.tiles_total,
            "seconds": seconds, "seconds_per_entry": seconds / pairs}  # fmt: skip


def _run(cmd: list[str], pin: str | None = None) -> dict:
    if pin is not None:
        cmd = ["taskset", "-c", pin, *cmd]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def main() -> None:
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from results_io import RESULTS, machine, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[5, 7, 10])
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    ap.add_argument("--nt-blocks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--block", type=int, default=4, help="ntk_scale's block of b x b images")
    ap.add_argument("--out", default=str(RESULTS / "conv_kernels.json"))
    ap.add_argument("--gram-n", type=int, default=64, help="images of the system Gram (0: skip)")
    ap.add_argument("--gram-tile", type=int, default=32)
    a = ap.parse_args()
    rng = np.random.default_rng(20261201)
    n = max([a.block, *a.nt_blocks])
    tmp = tempfile.mkdtemp(prefix="conv-bench-")
    data = os.path.join(tmp, "x.npz")
    np.savez(data, x1=rng.standard_normal((n, 32, 32, 3)), x2=rng.standard_normal((n, 32, 32, 3)))
    me = [sys.executable, __file__, "--child"]
    rows, cores = [], sorted(os.sched_getaffinity(0))
    for depth in a.depths:
        ref64 = None
        for dtype in a.dtypes:
            nt = {b: _run(["bash", str(ORACLE), __file__, "--child", "nt", data, str(depth), dtype,
                           str(b)]) for b in a.nt_blocks}  # fmt: skip
            if dtype == "float64":
                ref64 = nt[max(nt)]
            ours = _run([*me, "ours", data, str(depth), dtype, str(a.block)])
            pinned = _run([*me, "ours", data, str(depth), dtype, str(a.block)], pin=str(cores[-1]))
            best_b = min(nt, key=lambda b: nt[b]["seconds"] / nt[b]["entries"])
            nt_entry = nt[best_b]["seconds"] / nt[best_b]["entries"]
            ours_entry = ours["ntk_seconds"] / ours["entries"]
            m = min(a.block, max(nt))
            err = None
            if ref64 is not None:
                err = max(_rel(np.asarray(ours[k])[:m, :m], np.asarray(ref64[k])[:m, :m])
                          for k in ("ntk", "nngp"))  # fmt: skip
            gram = None
            if a.gram_n:
                gram = system_gram(depth, dtype, a.gram_n, a.gram_tile, len(cores))
            rows.append({
                "kernel": f"myrtle{depth}", "dtype": dtype,
                "nt_seconds_per_entry": nt_entry, "nt_best_block": best_b,
                "nt_per_block": {b: nt[b]["seconds"] / nt[b]["entries"] for b in nt},
                "nt_peak_mb": max(v["peak_mb"] for v in nt.values()),
                "ours_seconds_per_entry": ours_entry,
                "ours_pair_seconds_tile_scale": ours["ntk_pair_seconds"],
                "ours_nngp_only_seconds_per_entry": ours["nngp_seconds"] / ours["entries"],
                "ours_one_core_seconds_per_entry": pinned["ntk_seconds"] / pinned["entries"],
                "ours_one_core_pair_seconds_tile_scale": pinned["ntk_pair_seconds"],
                "ours_peak_mb": ours["peak_mb"], "ours_one_core_peak_mb": pinned["peak_mb"],
                "ours_chunk_pairs": ours["chunk"],
                "speedup": nt_entry / ours_entry,
                "speedup_tile_scale": nt_entry / ours["ntk_pair_seconds"],
                "max_rel_err_vs_nt_float64": err, "bound": BOUND[dtype],
                "system_gram": gram,
                "speedup_system": None if gram is None else nt_entry / gram["seconds_per_entry"],
            })  # fmt: skip
            _print(rows[-1])
    write_json(a.out, {"machine": machine(), "block": a.block, "rows": rows})


def _print(r: dict) -> None:
    err = "-" if r["max_rel_err_vs_nt_float64"] is None else f"{r['max_rel_err_vs_nt_float64']:.1e}"
    print(f"{r['kernel']:9s} {r['dtype']:8s} NT {r['nt_seconds_per_entry'] * 1e3:7.1f} ms/entry "
          f"(b={r['nt_best_block']}, {r['nt_peak_mb']:.0f} MB) | ntk_scale "
          f"{r['ours_seconds_per_entry'] * 1e3:6.1f} ms/entry, tile scale "
          f"{r['ours_pair_seconds_tile_scale'] * 1e3:5.1f}, one core "
          f"{r['ours_one_core_pair_seconds_tile_scale'] * 1e3:5.1f} ({r['ours_peak_mb']:.0f} MB) | "
          f"x{r['speedup']:.1f} (x{r['speedup_tile_scale']:.1f} at tile scale) | err {err}",
          flush=True)  # fmt: skip
    if r["system_gram"] is not None:
        g = r["system_gram"]
        print(f"{'':19s}system Gram N={g['n']} tile={g['tile']} on {g['workers']} workers: "
              f"{g['seconds_per_entry'] * 1e3:.1f} ms/entry, x{r['speedup_system']:.1f} vs NT",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        who, data, depth, dtype, block = sys.argv[2:7]
        fn = child_nt if who == "nt" else child_ours
        print(json.dumps(fn(data, int(depth), dtype, int(block))), flush=True)
    else:
        main()
