"""A solve process for the kill-and-resume test: solve_store with checkpoints, printing progress.

Usage: python solve_driver.py STORE OUT_DIR TARGETS.npy RIDGE RANK TOL — preconditioner
rpcholesky, checkpoint_every=2. Prints ``iteration k`` after each PCG iteration; the environment
variable NTK_SOLVE_SLEEP (seconds, default 0) slows each iteration so that a kill lands mid-way.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

from ntk_scale.solve import solve_store


def progress(state) -> None:
    print(f"iteration {state.iteration}", flush=True)
    time.sleep(float(os.environ.get("NTK_SOLVE_SLEEP", "0")))


if __name__ == "__main__":
    store, out_dir, targets = sys.argv[1:4]
    ridge, rank, tol = float(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    report = solve_store(
        store,
        np.load(targets),
        ridge=ridge,
        preconditioner="rpcholesky",
        rank=rank,
        tol=tol,
        out_dir=out_dir,
        checkpoint_every=2,
        callback=progress,
    )
    print(f"done {report.result.iterations}", flush=True)
