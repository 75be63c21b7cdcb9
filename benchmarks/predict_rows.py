"""Predictions for 10⁶ rows in the memory of one block: `ntk-scale predict` from a memory-mapped
X* (M, d) on disk to a Zarr array, for M = 10⁵ and 10⁶, with the peak RSS of the whole process
tree (the CLI and the local Ray it starts) sampled every 0.2 s.

X* for M = 10⁶ at d = 256 is 2.0 GB of float64: a predict that read it whole would show it in
its anonymous RSS; file-backed pages of the memory map do stay resident after they are read
(the kernel reclaims them when it needs the memory), so both are reported. The model is a
float32 store of N = --n training rows. Prints a table; writes
benchmarks/results/predict_rows.json.

    .venv/bin/python benchmarks/predict_rows.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from real_tables import _stage
from results_io import RESULTS, machine, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--rows", default="100000,1000000")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="predict-rows-"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(a.n, a.d)) / np.sqrt(a.d)
    np.save(work / "x.npy", x)
    np.save(work / "y.npy", np.sin(x.sum(axis=1)))
    _stage(["gram", "--x", str(work / "x.npy"), "--store", str(work / "g.zarr"), "--workers",
            str(a.workers), "--no-progress"])  # fmt: skip
    _stage(["solve", "--store", str(work / "g.zarr"), "--y", str(work / "y.npy"), "--model-dir",
            str(work / "m"), "--ridge", "1e-2", "--tol", "1e-6", "--no-progress"])  # fmt: skip
    rows = []
    for m in (int(v) for v in a.rows.split(",")):
        xs = np.lib.format.open_memmap(work / f"xs{m}.npy", "w+", np.float64, (m, a.d))
        for r0 in range(0, m, 100_000):  # written in blocks: this process never holds X*
            r1 = min(m, r0 + 100_000)
            xs[r0:r1] = rng.normal(size=(r1 - r0, a.d)) / np.sqrt(a.d)
        xs.flush()
        del xs
        s = _stage(["predict", "--model-dir", str(work / "m"), "--x", str(work / f"xs{m}.npy"),
                    "--out", str(work / f"p{m}.zarr"), "--workers", str(a.workers)])  # fmt: skip
        rows.append({"rows": m, "x_star_bytes": m * a.d * 8, "seconds": s["seconds"],
                     "peak_rss_bytes": s["peak_rss_bytes"],
                     "peak_anon_rss_bytes": s["peak_anon_rss_bytes"]})  # fmt: skip
    result = {"machine": machine(), "config": vars(a), "rows": rows}
    print(f"\npredict from a memory-mapped X* (d = {a.d}) to Zarr, N = {a.n}:")
    for r in rows:
        print(
            f"  M = {r['rows']:>9,}  X* {r['x_star_bytes'] / 1e9:5.2f} GB  "
            f"{r['seconds']:7.1f} s  peak RSS (CLI + Ray) {r['peak_rss_bytes'] / 1e9:5.2f} GB, "
            f"anonymous {r['peak_anon_rss_bytes'] / 1e9:5.2f} GB"
        )
    write_json(RESULTS / "predict_rows.json", result)


if __name__ == "__main__":
    main()
