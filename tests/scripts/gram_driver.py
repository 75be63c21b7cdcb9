"""A driver process for the driver-loss test: computes a Gram store on its own local Ray.

Usage: python gram_driver.py STORE N TILE — the data is regenerated from a fixed seed.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

from ntk_scale import FullyConnected, stages
from ntk_scale.options import GramOptions, RunOptions

SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)


def data(n: int) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(n, 64))


if __name__ == "__main__":
    store, n, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    report = stages.gram(
        data(n),
        SPEC,
        store,
        GramOptions(dtype="float64", tile=tile),
        # joined by RAY_ADDRESS, a cluster: GPUs by default, and this test cluster has none
        RunOptions(workers=2, progress=False, wait_seconds=1.0, accelerator="cpu"),
    )
    print(report.summary(), flush=True)
