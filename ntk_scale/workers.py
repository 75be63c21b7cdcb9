"""Plain worker classes (no Ray inside): a tile computer. Ray wraps them once, at the edge."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import numpy as np

from ntk_scale.plan import pad_rows
from ntk_scale.store import GramStore


class TileWorker:
    """Computes tiles of one store and writes each (chunk, then marker) itself.

    It reads its input rows from the store's copy of X, so X travels to each worker once per
    block it needs, never through the driver. The tile function is compiled once, for the one
    padded tile shape, when the worker starts.
    """

    def __init__(self, store_url: str, cpus: list[int] | None = None):
        if cpus:
            # XLA's CPU thread pool sizes itself from the schedulable cores (XLA_FLAGS thread
            # options did not bound it here): pin before the first computation creates it.
            os.sched_setaffinity(0, {c % os.cpu_count() for c in cpus})
        from ntk_scale.kernels import tile_function

        self.store = GramStore.open(store_url, mode="r+")
        meta = self.store.meta
        spec, self.size = meta.spec, meta.tile
        self._fn = tile_function(spec, meta.kind, meta.dtype)
        self._sym = tile_function(spec, meta.kind, meta.dtype, symmetric=True)
        self._compute_lock = threading.Lock()
        zeros = np.zeros((self.size, meta.d), dtype=meta.dtype)
        np.asarray(self._fn(zeros, zeros))  # compile now, not inside the first tile's timing
        if meta.symmetric:
            np.asarray(self._sym(zeros, zeros))

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return _node_id()

    def compute(self, i: int, j: int) -> dict[str, Any]:
        """Compute, write and mark tile (i, j). Returns where and how long it took."""
        tile = self.store.plan.tile_at(i, j)
        with self._compute_lock:
            t0, started = time.perf_counter(), time.time()
            x1 = pad_rows(self.store.x_block("rows", i), self.size)
            if tile.diagonal and self.store.meta.symmetric:
                values = np.asarray(self._sym(x1, x1))
            else:
                x2 = pad_rows(self.store.x_block("cols", j), self.size)
                values = np.asarray(self._fn(x1, x2))
            values = values[: tile.shape[0], : tile.shape[1]]
            t1 = time.perf_counter()
        info = {"node": _node_id(), "host": socket.gethostname(), "pid": os.getpid()}
        info.update(compute_s=t1 - t0, start=started)
        self.store.write_tile(tile, values, info)
        info.update(write_s=time.perf_counter() - t1, end=time.time(), bytes=values.nbytes)
        info["entries"] = values.size
        return {"i": i, "j": j, **info}


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # pragma: no cover - outside Ray there is no node id
        pass
    return socket.gethostname()
