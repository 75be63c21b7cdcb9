"""End to end on the default CPU setup: gram -> solve -> predict, wall time per stage, peak memory.

    python benchmarks/end_to_end.py                       # N = 50,000, 10,000 test rows, d = 784
    python benchmarks/end_to_end.py --n 5000 --series 0   # quick

Data: a synthetic teacher-student problem (a random 2-hidden-layer ReLU teacher with 10 outputs
and 10 % label noise on inputs in R^784), made with numpy. Peak memory is the largest total
resident set of the driver and every Ray worker process, sampled every 0.2 s. With --series the
scaling figure (test error and time against N on a doubling series) is written as PNG + JSON.
Tables and JSON go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
from ntk_scale.pipeline import stage_predict, stage_solve
from results_io import RESULTS, machine, write_json

from ntk_scale import FullyConnected, stages
from ntk_scale.cluster import ensure_ray
from ntk_scale.options import GramOptions, RunOptions

SPEC = FullyConnected(depth=3, activation="relu", W_std=2**0.5, b_std=0.1)


def teacher_student(n: int, m: int, d: int = 784, outputs: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    w1, w2 = rng.normal(size=(d, 256)) / np.sqrt(d), rng.normal(size=(256, 256)) / 16
    w3 = rng.normal(size=(256, outputs)) / 16
    x = rng.normal(size=(n + m, d)).astype(np.float32)
    f = np.maximum(np.maximum(x @ w1, 0) @ w2, 0) @ w3
    f = (f - f.mean(0)) / f.std(0)
    y = f + 0.1 * rng.normal(size=f.shape)
    return x[:n], y[:n], x[n:], f[n:]


class PeakMemory:
    """Largest total RSS of this process and all Ray processes on this machine."""

    def __init__(self, period: float = 0.2):
        self.peak, self.period, self._stop = 0, period, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        """Sum of RSS (from /proc) over this process and every Ray process."""
        total, page = 0, os.sysconf("SC_PAGE_SIZE")
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                if int(pid) != os.getpid() and "ray" not in cmd:
                    continue
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * page
            except (OSError, ValueError, IndexError):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def run_once(n: int, m: int, d: int, workdir: Path, solver: dict, tile: int) -> dict:
    x, y, xs, fs = teacher_student(n, m, d)
    store, model = str(workdir / f"gram-{n}.zarr"), str(workdir / f"model-{n}")
    t = {}
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        gram = stages.gram(x, SPEC, store, GramOptions(tile=tile), RunOptions(progress=False))
        t["gram_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        meta = stage_solve(store, y, model, solver, None)
        t["solve_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = stage_predict(model, xs, store)
        t["predict_s"] = time.perf_counter() - t0
    err = float(np.mean((pred - fs) ** 2) / np.mean(fs**2))
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(model, ignore_errors=True)
    return {
        "n": n,
        "m": m,
        "d": d,
        **t,
        "total_s": sum(t.values()),
        "peak_rss_bytes": mem.peak,
        "relative_test_mse": err,
        "tiles": gram.tiles_total,
        "pcg_iterations": meta["solver"]["iterations"],
        "converged": all(meta["solver"]["converged"]),
        "preconditioner": meta["solver"]["preconditioner"],
    }


def plot_series(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    a.loglog(n, [r["relative_test_mse"] for r in rows], "o-")
    a.set_xlabel("training samples N")
    a.set_ylabel("relative test MSE")
    a.set_title("test error vs N")
    b.loglog(n, [r["total_s"] for r in rows], "o-", label="total")
    b.loglog(n, [r["gram_s"] for r in rows], "s--", label="gram")
    b.loglog(n, [r["solve_s"] for r in rows], "^--", label="solve")
    b.set_xlabel("training samples N")
    b.set_ylabel("seconds")
    b.set_title("wall time vs N (2 CPU cores)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--m", type=int, default=10_000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--series", type=int, default=4, help="smaller sizes N/2, N/4, ... (0: none)")
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--rank", type=int, default=1000)
    ap.add_argument("--merge", default=None, help="a previous end_to_end JSON whose rows to add")
    a = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ntk-e2e-"))
    solver = {
        "ridge": a.ridge,
        "tol": a.tol,
        "rank": a.rank,
        "preconditioner": "rpcholesky",
        "pivot_block": 50,
        "max_iter": 500,
    }
    ensure_ray(None)
    sizes = [a.n // 2**k for k in range(a.series, 0, -1)] + [a.n]
    rows = []
    for n in sizes:
        rows.append(run_once(n, a.m, a.d, workdir, solver, a.tile))
        r = rows[-1]
        print(
            f"N={n:>7,}  gram {r['gram_s']:7.1f} s  solve {r['solve_s']:7.1f} s "
            f"({r['pcg_iterations']} it)  predict {r['predict_s']:6.1f} s  total "
            f"{r['total_s']:7.1f} s  peak {r['peak_rss_bytes'] / 1e9:5.2f} GB  "
            f"test rel-MSE {r['relative_test_mse']:.4f}",
            flush=True,
        )
    if a.merge:
        old = json.loads(Path(a.merge).read_text())["rows"]
        rows = sorted(
            rows + [r for r in old if r["n"] not in {x["n"] for x in rows}], key=lambda r: r["n"]
        )
    top = rows[-1]
    print(
        f"\nN = {top['n']:,} train, {a.m:,} test, d = {a.d}, 10 outputs, FC-3 ReLU NTK, "
        f"float32 store, {os.cpu_count()} cores"
    )
    print(f"  {'stage':<10}{'wall s':>10}")
    for k in ("gram_s", "solve_s", "predict_s", "total_s"):
        print(f"  {k[:-2]:<10}{top[k]:>10.1f}")
    print(
        f"  peak memory {top['peak_rss_bytes'] / 1e9:.2f} GB  (goal: total < 600 s, peak < 8 GB: "
        f"{'met' if top['total_s'] < 600 and top['peak_rss_bytes'] < 8e9 else 'NOT met'})"
    )
    write_json(RESULTS / "end_to_end.json", {"rows": rows, "solver": solver, **machine()})
    if len(rows) > 1:
        plot_series(rows, RESULTS / "end_to_end_scaling.png")
        print(f"wrote {RESULTS / 'end_to_end_scaling.png'}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
