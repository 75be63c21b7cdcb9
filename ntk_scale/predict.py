"""Predictions K(X*, X) @ A on the pool's hosts: rectangular tiles computed and multiplied at once.

Nothing of K(X*, X) is stored: each host holds a :class:`ntk_scale.actors.ProductWorker` (X and
A, the same fused tile-times-matrix path as the matrix-free operator) and takes one row block of
X* at a time. Row blocks are queued on the hosts; a block on a host that dies runs again on
another. Memory per host: X, A and one tile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ntk_scale.actors import ProductWorker, pool_for
from ntk_scale.kernels import Network, check_features
from ntk_scale.options import RunOptions
from ntk_scale.plan import BlockPlan
from ntk_scale.progress import Progress
from ntk_scale.store import GramStore
from ntk_scale.tasks import RoleGroup, run_queue


def predict_from_store(
    store_url: str,
    alpha: np.ndarray,
    x_star: Any,
    run: RunOptions | None = None,
    on_block: Callable[[int], None] | None = None,
) -> np.ndarray:
    """K(x_star, X) @ alpha with X the store's training inputs.

    alpha: (N,) or (N, C); x_star: (M, d) array-like. Returns (M,) or (M, C) float64.
    on_block: called on the driver with each finished row block's index (tests inject faults).
    """
    run = run or RunOptions()
    store = GramStore.open(store_url)
    meta = store.meta
    x_star = flat_samples(x_star, meta.spec, meta.d)
    a = np.asarray(alpha, dtype=np.float64)
    a2 = a[:, None] if a.ndim == 1 else a
    if a2.shape[0] != meta.n_cols:
        raise ValueError(f"alpha has {a2.shape[0]} rows, the store's X has {meta.n_cols}")
    X = np.vstack([store.x_block("cols", b) for b in range(store.plan.col_blocks)])
    plan = BlockPlan(x_star.shape[0], meta.n_cols, meta.tile, symmetric=False)
    pool = pool_for(run)
    slots = pool.take(run.workers, limit=plan.row_blocks)
    refs = (pool.ray.put(X), pool.ray.put(a2))

    def args(k: int) -> tuple:
        return (meta.spec, refs[0], meta.kind, meta.dtype, meta.tile, 0, None, refs[1])

    out = np.empty((x_star.shape[0], a2.shape[1]))
    with RoleGroup(pool, slots, ProductWorker, args, run, "predict").start() as group:
        _run_blocks(group, plan, x_star, out, run, on_block)
    return out[:, 0] if a.ndim == 1 else out


def flat_samples(x_star: Any, spec: Any, d: int) -> np.ndarray:
    """x_star as validated (M, d) rows: (M, d) features, or (M, *S) samples of a network bound
    to S."""
    arr = np.asarray(x_star)
    if isinstance(spec, Network) and arr.ndim > 2:
        if arr.shape[1:] != spec.sample_shape:
            raise ValueError(
                f"x_star has samples of shape {arr.shape[1:]}, the model was fitted "
                f"on {spec.sample_shape}; reshape them to (M, *{spec.sample_shape})"
            )
        arr = arr.reshape(arr.shape[0], -1)
    return check_features(arr, "x_star", dim=d)


def _run_blocks(group: RoleGroup, plan: BlockPlan, x_star, out, run, on_block) -> None:
    """out[rows of block i] = K(x*_i, X) @ A for every row block i, with progress."""
    start, rows = time.perf_counter(), [0]
    bar = Progress("predict", x_star.shape[0], "rows", enabled=run.show_progress)

    def block_args(i: int) -> tuple:
        r0, r1 = plan.row_range(i)
        return (x_star[r0:r1], out.shape[1])

    def finished(i: int, values: np.ndarray) -> None:
        r0, r1 = plan.row_range(i)
        out[r0:r1] = values
        rows[0] += r1 - r0
        bar.update(advance=r1 - r0, rate=f"{rows[0] / (time.perf_counter() - start):.3g} rows/s")
        if on_block is not None:
            on_block(i)

    with bar:
        run_queue(group, range(plan.row_blocks), "product", block_args, finished,
                  name_of=lambda i: f"predict row block {i}")  # fmt: skip
