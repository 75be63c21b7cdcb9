"""DistributedOperator: K @ P over row panels held by the pool's hosts.

Each host holds a :class:`ntk_scale.roles.PanelWorker` for a contiguous range of row blocks
[a, b) and answers with its rows of K @ P. The driver puts P into the object store once per
product, so it travels once per node; the answers are concatenated in row order. A host that
dies is replaced, its panels loaded again and its rows computed again: the product is the same
bytes, so a solve goes on on the same trajectory.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ntk_scale.linalg.operators import check_block
from ntk_scale.linalg.stored import StoreBacked
from ntk_scale.options import RunOptions, default
from ntk_scale.options import SolveOptions as _Solve
from ntk_scale.panels import open_symmetric, partition_blocks
from ntk_scale.pool import pool_for
from ntk_scale.roles import PanelWorker
from ntk_scale.tasks import RoleGroup

DEFAULT_BUDGET = default(_Solve, "memory_budget_bytes")


class DistributedOperator(StoreBacked):
    """A GramOperator whose products run on ``n_actors`` pool hosts holding row panels.

    store_url: a symmetric store every host can open (a shared path or an object-store URL).
    memory_budget_bytes: per host; panels that do not fit are streamed each product.
    run: where the hosts run and the timeouts (RunOptions; n_actors overrides its workers).
    diag and columns are computed on the driver. Close with :meth:`close` or ``with``: the
    panels are dropped, the hosts stay in the pool.
    """

    def __init__(
        self,
        store_url: str,
        n_actors: int | None = None,
        memory_budget_bytes: int = DEFAULT_BUDGET,
        run: RunOptions | None = None,
    ) -> None:
        run = run or RunOptions()
        self.store = open_symmetric(store_url)
        self.shape, self.dtype = self.store.shape, self.store.dtype
        pool = pool_for(run)
        slots = pool.take(n_actors or run.workers, limit=self.store.plan.row_blocks)
        self.ranges = partition_blocks(self.store.plan, len(slots))
        budget = int(memory_budget_bytes)

        def args(k: int) -> tuple:
            return (store_url, *self.ranges[k], budget)

        self.group = RoleGroup(pool, slots[: len(self.ranges)], PanelWorker, args, run, "panel")
        self._ray = pool.ray
        self._diag: np.ndarray | None = None
        try:
            self.group.start()
            self.worker_stats = self.stats()
        except BaseException:
            self.close()
            raise

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """K @ P. P: (N, C) float64 -> (N, C) float64; P is sent once through the object store."""
        P = np.ascontiguousarray(check_block(P, self.shape[0]))
        ref = self._ray.put(P)
        return np.concatenate(self.group.call_all("matmat", ref, what="computing a product"))

    def stats(self) -> list[dict[str, Any]]:
        """Each host's PanelWorker.stats(), in row order."""
        return self.group.call_all("stats", what="reporting stats")

    def close(self) -> None:
        """Drop the panels (idempotent)."""
        self.group.close()

    def __enter__(self) -> DistributedOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DistributedOperator({self.store.url!r}, shape={self.shape}, dtype={self.dtype}, "
            f"ranges={self.ranges})"
        )
