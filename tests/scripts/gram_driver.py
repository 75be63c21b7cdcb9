"""A driver process for the driver-loss test: computes a Gram store on its own local Ray.

Usage: python gram_driver.py STORE N TILE — the data is regenerated from a fixed seed. The
environment variable NTK_GRAM_SLEEP (seconds, default 0) slows the driver after each finished
tile (at most tasks_per_worker tiles stay in flight), so that a kill lands mid-run however fast
the machine computes the tiles.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

from ntk_scale import FullyConnected, stages
from ntk_scale.options import GramOptions, RunOptions

SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)


def data(n: int) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(n, 64))


if __name__ == "__main__":
    store, n, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pause = float(os.environ.get("NTK_GRAM_SLEEP", "0"))
    report = stages.gram(
        data(n),
        SPEC,
        store,
        GramOptions(dtype="float64", tile=tile),
        # joined by RAY_ADDRESS, a cluster: GPUs by default, and this test cluster has none
        RunOptions(workers=2, progress=False, wait_seconds=1.0, accelerator="cpu"),
        on_tile=(lambda record: time.sleep(pause)) if pause > 0 else None,
    )
    print(report.summary(), flush=True)
