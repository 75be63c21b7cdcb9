"""DistributedOperator: K @ P over row panels held by Ray actors.

Each actor owns a contiguous range of row blocks [a, b) and answers with its rows of K @ P. The
driver puts P into the object store once per product, so it travels once per node; the actors'
answers are concatenated in row order. An actor keeps its row panels in memory when they fit its
memory budget (read once at startup) and otherwise streams its tiles from the store each product.
With the symmetric layout both paths read each needed stored tile once: tile (i, j), i <= j,
gives block (i, j) when i is owned and block (j, i) = tileᵀ when j is owned.

:class:`PanelWorker` is a plain class (testable without Ray); Ray wraps it once, at the edge.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from ntk_scale.cluster import ensure_ray, gather, worker_env
from ntk_scale.linalg.operators import check_block
from ntk_scale.linalg.stored import (
    UPCAST_ROWS,
    StoreBacked,
    add_products,
    open_symmetric,
    stream_tiles,
    tile_products,
    tiles_touching,
)
from ntk_scale.plan import BlockPlan

DEFAULT_BUDGET = 2 * 2**30


def partition_blocks(plan: BlockPlan, parts: int) -> list[tuple[int, int]]:
    """Split the row blocks into ``parts`` contiguous ranges [a, b) of near-equal entries.

    A range's weight is the entries of its row panels (rows x N): what its actor holds in memory
    (or reads per product) and multiplies. Every range gets at least one block, so fewer than
    ``parts`` ranges come back when there are fewer row blocks.
    """
    if parts < 1:
        raise ValueError(f"n_actors={parts} must be >= 1")
    blocks = plan.row_blocks
    parts = min(parts, blocks)
    cum = np.cumsum([_rows(plan, i) * plan.n_cols for i in range(blocks)])
    targets = cum[-1] * np.arange(1, parts) / parts
    cuts = [int(np.argmin(np.abs(cum - t))) + 1 for t in targets]
    bounds = [0]
    for k, cut in enumerate(cuts):  # strictly increasing, leaving a block for each later range
        bounds.append(min(max(cut, bounds[-1] + 1), blocks - (parts - 1 - k)))
    bounds.append(blocks)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class PanelWorker:
    """Holds (or streams) the row panels of row blocks [a, b) of a symmetric store.

    memory_budget_bytes: the panels are kept in memory, in the storage dtype, when their bytes
    (rows x N x itemsize) fit; otherwise each product streams the tiles, ``read_ahead`` ahead.
    """

    def __init__(
        self, store_url: str, a: int, b: int, memory_budget_bytes: int, read_ahead: int = 2
    ) -> None:
        self.store = open_symmetric(store_url)
        plan = self.store.plan
        self.a, self.b, self.read_ahead = int(a), int(b), int(read_ahead)
        self.r0, self.r1 = plan.row_range(self.a)[0], plan.row_range(self.b - 1)[1]
        self.tiles = tiles_touching(plan, self.a, self.b)
        self.panel_bytes = (self.r1 - self.r0) * plan.n_cols * self.store.dtype.itemsize
        self.bytes_read = 0
        self.panels: list[np.ndarray] | None = None
        if self.panel_bytes <= memory_budget_bytes:
            self.panels = self._load_panels()

    def _load_panels(self) -> list[np.ndarray]:
        """Row panel i (rows_i, N) for each owned block, each needed stored tile read once."""
        plan, dtype = self.store.plan, self.store.dtype
        panels = [
            np.empty((_rows(plan, i), plan.n_cols), dtype=dtype) for i in range(self.a, self.b)
        ]
        for t, nbytes, values in stream_tiles(self.store, self.tiles, None, self.read_ahead):
            self.bytes_read += nbytes
            if self.a <= t.i < self.b:
                panels[t.i - self.a][:, t.cols] = values
            if t.i != t.j and self.a <= t.j < self.b:
                panels[t.j - self.a][:, t.rows] = values.T
        return panels

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """Rows r0:r1 of K @ P. P: (N, C) float64 -> (r1 - r0, C) float64."""
        P = np.asarray(P, dtype=np.float64)
        if self.panels is not None:
            return np.vstack([_panel_product(panel, P, self.store.plan) for panel in self.panels])
        out = np.zeros_like(P)
        fn = functools.partial(tile_products, P=P, a=self.a, b=self.b)
        for t, nbytes, products in stream_tiles(self.store, self.tiles, fn, self.read_ahead):
            self.bytes_read += nbytes
            add_products(out, t, products)
        return out[self.r0 : self.r1].copy()

    def stats(self) -> dict[str, Any]:
        """What this worker holds: its blocks, rows, panel bytes, mode and bytes read so far."""
        return {
            "blocks": (self.a, self.b),
            "rows": (self.r0, self.r1),
            "panel_bytes": self.panel_bytes,
            "in_memory": self.panels is not None,
            "bytes_read": self.bytes_read,
            "pid": os.getpid(),
        }


def _rows(plan: BlockPlan, i: int) -> int:
    r0, r1 = plan.row_range(i)
    return r1 - r0


def _panel_product(panel: np.ndarray, P: np.ndarray, plan: BlockPlan) -> np.ndarray:
    """panel @ P in float64. A float32 panel is upcast ``UPCAST_ROWS`` rows of one tile-wide column
    block at a time (about an L2 cache of float64), never as a whole float64 copy."""
    if panel.dtype == np.float64:
        return panel @ P
    out = np.zeros((panel.shape[0], P.shape[1]))
    for j in range(plan.col_blocks):
        c0, c1 = plan.col_range(j)
        for r in range(0, panel.shape[0], UPCAST_ROWS):
            block = np.asarray(panel[r : r + UPCAST_ROWS, c0:c1], dtype=np.float64)
            out[r : r + UPCAST_ROWS] += block @ P[c0:c1]
    return out


class DistributedOperator(StoreBacked):
    """A GramOperator whose products run on ``n_actors`` Ray actors holding row panels.

    store_url: a symmetric store every actor can open (a shared path or an object-store URL).
    memory_budget_bytes: per actor; panels that do not fit are streamed each product.
    address: the Ray cluster (None: the running Ray or a new local one, see ensure_ray).
    timeout_s: limit for the actors' start (panel loading) and for each product.
    diag and columns are read from the store by the driver. Close with :meth:`close` or ``with``.
    """

    def __init__(
        self,
        store_url: str,
        n_actors: int = 2,
        memory_budget_bytes: int = DEFAULT_BUDGET,
        address: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.store = open_symmetric(store_url)
        self.shape, self.dtype = self.store.shape, self.store.dtype
        self.timeout_s = float(timeout_s)
        self.ranges = partition_blocks(self.store.plan, n_actors)
        self._ray = ensure_ray(address)
        remote = self._ray.remote(PanelWorker).options(
            num_cpus=1, max_restarts=0, runtime_env={"env_vars": worker_env(False, 1)}
        )
        self.actors = [
            remote.remote(store_url, a, b, int(memory_budget_bytes)) for a, b in self.ranges
        ]
        self._diag: np.ndarray | None = None
        try:
            self.worker_stats = self._get([w.stats.remote() for w in self.actors], "starting")
        except BaseException:
            self.close()
            raise

    def _get(self, refs: list[Any], what: str) -> list[Any]:
        fix = "lower memory_budget_bytes or use more actors, then build a new DistributedOperator"
        return gather(self._ray, refs, self.timeout_s, "panel", what, fix)

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """K @ P. P: (N, C) float64 -> (N, C) float64; P is sent once through the object store."""
        P = np.ascontiguousarray(check_block(P, self.shape[0]))
        if not self.actors:
            raise RuntimeError("this DistributedOperator is closed; build a new one")
        ref = self._ray.put(P)
        parts = self._get([w.matmat.remote(ref) for w in self.actors], "computing a product")
        return np.concatenate(parts, axis=0)

    def stats(self) -> list[dict[str, Any]]:
        """Each actor's PanelWorker.stats(), in row order."""
        return self._get([w.stats.remote() for w in self.actors], "reporting stats")

    def close(self) -> None:
        """Kill the actors (idempotent)."""
        for actor in self.actors:
            self._ray.kill(actor, no_restart=True)
        self.actors = []

    def __enter__(self) -> DistributedOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DistributedOperator({self.store.url!r}, shape={self.shape}, dtype={self.dtype}, "
            f"ranges={self.ranges})"
        )
