"""Predictions K(X*, X) @ A: rectangular tiles computed by Ray actors and multiplied at once.

Nothing of K(X*, X) is stored: an actor takes one row block of X* at a time and loops over the
column blocks of X, holding one tile (fused with its product by A, see
:func:`ntk_scale.kernels.tile_matmul_function`). Memory per actor: one tile plus X and A.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ntk_scale.kernels import check_features, tile_matmul_function
from ntk_scale.plan import BlockPlan, pad_rows
from ntk_scale.store import GramStore


class PanelProductWorker:
    """Computes K(x_block, X) @ P for row blocks, X read once from the store's copy."""

    def __init__(self, store_url: str, cpus: list[int] | None = None):
        if cpus:
            os.sched_setaffinity(0, {c % os.cpu_count() for c in cpus})
        store = GramStore.open(store_url)
        meta = store.meta
        self.tile, self.plan = meta.tile, store.plan
        self.x_blocks = [
            pad_rows(store.x_block("cols", j), self.tile) for j in range(self.plan.col_blocks)
        ]
        self.fn = tile_matmul_function(meta.spec, meta.kind, meta.dtype)

    def pid(self) -> int:
        return os.getpid()

    def product(self, x_block: np.ndarray, p: np.ndarray) -> np.ndarray:
        """x_block: (r <= tile, d), p: (n_cols, c) -> K(x_block, X) @ p, (r, c) float64."""
        rows = x_block.shape[0]
        x1 = pad_rows(np.asarray(x_block), self.tile)
        out = np.zeros((self.tile, p.shape[1]), dtype=np.float64)
        for j, x2 in enumerate(self.x_blocks):
            c0, c1 = self.plan.col_range(j)
            pj = np.zeros((self.tile, p.shape[1]), dtype=np.float64)
            pj[: c1 - c0] = p[c0:c1]
            out += np.asarray(self.fn(x1, x2, pj))
        return out[:rows]


def predict_from_store(
    store_url: str,
    alpha: np.ndarray,
    x_star: Any,
    workers: int | None = None,
    address: str | None = None,
    timeout: float = 3600.0,
) -> np.ndarray:
    """K(x_star, X) @ alpha with X the store's training inputs.

    alpha: (N,) or (N, C); x_star: (M, d) array-like. Returns (M,) or (M, C) float64.
    """
    from ntk_scale.cluster import ensure_ray
    from ntk_scale.scheduler import RunOptions, _cores

    store = GramStore.open(store_url)
    x_star = check_features(np.asarray(x_star), "x_star", dim=store.meta.d)
    a = np.asarray(alpha, dtype=np.float64)
    a2 = a[:, None] if a.ndim == 1 else a
    if a2.shape[0] != store.meta.n_cols:
        raise ValueError(f"alpha has {a2.shape[0]} rows, the store's X has {store.meta.n_cols}")
    plan = BlockPlan(x_star.shape[0], store.meta.n_cols, store.meta.tile, symmetric=False)
    ray = ensure_ray(address)
    n = max(1, min(workers or int(ray.cluster_resources().get("CPU", 1)), plan.row_blocks))
    remote = ray.remote(PanelProductWorker).options(num_cpus=1, max_restarts=2, max_task_retries=2)
    actors = [
        remote.remote(store_url, _cores(k, RunOptions().threads_per_worker or 1, ray))
        for k in range(n)
    ]
    try:
        a_ref = ray.put(a2)
        refs = [
            actors[i % n].product.remote(x_star[slice(*plan.row_range(i))], a_ref)
            for i in range(plan.row_blocks)
        ]
        out = np.vstack(ray.get(refs, timeout=timeout))
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return out[:, 0] if a.ndim == 1 else out
