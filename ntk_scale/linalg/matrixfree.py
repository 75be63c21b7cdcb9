"""MatrixFreeOperator: K @ P recomputing every kernel tile, with no Gram matrix stored anywhere.

For a fully-connected kernel a tile costs less to recompute than to read back, so a product
K @ P is computed from X alone: for each row block i, a jitted function scans the column blocks
j, computes the tile K(x_i, x_j) in the kernel dtype and multiplies it by P_j in float64 in the
same compiled function, so the tile never leaves the device and at most one tile per worker is
alive at a time. The column scan runs inside the jitted function (one dispatch per row block,
not per tile, which matters on a GPU at N = 10^6), and the diagonal entries K(x, x) come from the
exact formula, as in the Gram store, so the operator agrees with a stored K to float32 rounding.
(Blocks (i, j) and (j, i) are computed separately, so K is symmetric to float32 rounding only.)

Work is split by row panel: a :class:`ntk_scale.roles.ProductWorker` owns row blocks [a, b)
and answers with its rows of K @ P (or of K[:, idx]), through the same fused tile-times-matrix
path as predict. ``local=True`` runs one in this process (one device, e.g. a single GPU);
otherwise the pool's hosts run one each, X reaching them once through the object store and P
once per product; a host that dies is replaced and its rows computed again.

Memory per worker: X (N x d in the kernel dtype), P padded (N x C float64), one tile (plus the
elementwise temporaries of one tile) and the (tile x C) accumulator.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np

from ntk_scale.kernels import Kernel, check_features
from ntk_scale.kernels.validate import DTYPES, KINDS, check_choice
from ntk_scale.linalg.operators import check_block, check_indices
from ntk_scale.options import RunOptions
from ntk_scale.panels import partition_blocks
from ntk_scale.plan import DEFAULT_TILE, BlockPlan
from ntk_scale.pool import pool_for
from ntk_scale.roles import ProductWorker
from ntk_scale.tasks import RoleGroup


class MatrixFreeOperator:
    """A GramOperator K = K(X, X) whose products recompute the kernel tiles (nothing stored).

    spec: the kernel; X: (N, d) features; kind: "ntk" or "nngp"; dtype: the tiles' dtype
    (float32 tiles use "highest" matmul precision, never TF32; products and sums are float64).
    tile: block side (edge blocks are padded, so one tile shape compiles once; capped at N).
    local=True: one in-process worker on this process's default JAX device (no Ray). Otherwise
    ``n_actors`` pool hosts (default run.workers: one per GPU of the cluster, else one per CPU)
    each own a contiguous range of row blocks; X is put into the object store once, P once per
    product. run: RunOptions (cluster address, timeouts).
    diag comes from the exact diagonal formula. Close with :meth:`close` or ``with``.
    """

    def __init__(
        self,
        spec: Kernel,
        X: Any,
        kind: str = "ntk",
        dtype: str = "float32",
        tile: int = DEFAULT_TILE,
        n_actors: int | None = None,
        local: bool = False,
        run: RunOptions | None = None,
    ) -> None:
        check_choice("kind", kind, KINDS)
        check_choice("dtype", dtype, DTYPES)
        if int(tile) < 1:
            raise ValueError(f"tile={tile} must be >= 1 (rows per recomputed block), e.g. 2048")
        self.spec, self.kind = spec, kind
        self.X = np.ascontiguousarray(check_features(X, "X"))
        n = int(self.X.shape[0])
        self.shape, self.dtype = (n, n), np.dtype(dtype)
        self.plan = BlockPlan.square(n, min(int(tile), n))
        self.last_product_seconds = 0.0
        self._diag = np.asarray(spec.diag(self.X, kind, dtype), dtype=np.float64)
        self._ray, self.group, self.local = None, None, None
        if local:
            self.ranges = [(0, self.plan.row_blocks)]
            self.local = ProductWorker(spec, self.X, kind, dtype, self.plan.tile)
        else:
            self._start_actors(n_actors, run or RunOptions())

    def _start_actors(self, n_actors: int | None, run: RunOptions) -> None:
        pool = pool_for(run)
        slots = pool.take(n_actors or run.workers, limit=self.plan.row_blocks)
        self.ranges = partition_blocks(self.plan, len(slots))
        x_ref, cfg = pool.ray.put(self.X), (self.kind, str(self.dtype), self.plan.tile)
        self._ray = pool.ray

        def args(k: int) -> tuple:
            return (self.spec, x_ref, *cfg, *self.ranges[k])

        self.group = RoleGroup(
            pool, slots[: len(self.ranges)], ProductWorker, args, run, "matrix-free"
        )
        try:
            self.group.start()
            self.worker_stats = self._call("stats", "starting")
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, what: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every worker, results in row order."""
        if self.local is not None:
            return [getattr(self.local, method)(*args)]
        return self.group.call_all(method, *args, what=what)

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """K @ P. P: (N, C) float64 -> (N, C) float64, every tile recomputed."""
        P = np.ascontiguousarray(check_block(P, self.shape[0]))
        start = time.perf_counter()
        arg = P if self.local is not None else self._ray.put(P)
        out = np.concatenate(self._call("matmat", "computing a product", arg), axis=0)
        self.last_product_seconds = time.perf_counter() - start
        return out

    def diag(self) -> np.ndarray:
        """diag(K): (N,) float64, from the exact diagonal formula."""
        return self._diag.copy()

    def columns(self, idx: Any) -> np.ndarray:
        """K[:, idx]. idx: (m,) int -> (N, m) float64, each worker computing its rows."""
        idx = check_indices(idx, self.shape[0])
        return np.concatenate(self._call("columns", "computing columns", idx), axis=0)

    def stats(self) -> list[dict[str, Any]]:
        """Each worker's ProductWorker.stats(), in row order."""
        return self._call("stats", "reporting stats")

    def close(self) -> None:
        """Drop the workers' state (idempotent); the hosts stay in the pool."""
        if self.group is not None:
            self.group.close()

    def __enter__(self) -> MatrixFreeOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "local" if self.local is not None else f"{len(self.ranges)} workers"
        return (
            f"MatrixFreeOperator(N={self.shape[0]}, kind={self.kind!r}, dtype={self.dtype}, "
            f"tile={self.plan.tile}, {where})"
        )


class PrecisionReport(NamedTuple):
    """Error of the ``dtype`` product against the float64 path on ``rows`` rows of K @ P:
    max_rel = max |Δ| / max |ref|, fro_rel = ||Δ||_F / ||ref||_F."""

    dtype: str
    rows: int
    max_rel: float
    fro_rel: float


def precision_report(
    spec: Kernel,
    X: Any,
    P: np.ndarray,
    kind: str = "ntk",
    dtype: str = "float32",
    tile: int = DEFAULT_TILE,
    row_blocks: int | None = None,
) -> PrecisionReport:
    """Measure the ``dtype`` matrix-free product against the float64 one, in-process.

    X: (N, d); P: (N, C). row_blocks: compare only the first row blocks (default all), since
    the float64 product costs a few times the float32 one.
    """
    X = check_features(X, "X")
    P = check_block(P, X.shape[0])
    tile = min(int(tile), X.shape[0])
    b = BlockPlan.square(X.shape[0], tile).row_blocks
    b = b if row_blocks is None else min(int(row_blocks), b)
    got = ProductWorker(spec, X, kind, dtype, tile, 0, b).matmat(P)
    ref = ProductWorker(spec, X, kind, "float64", tile, 0, b).matmat(P)
    diff = got - ref
    return PrecisionReport(
        dtype=dtype,
        rows=int(ref.shape[0]),
        max_rel=float(np.abs(diff).max() / np.abs(ref).max()),
        fro_rel=float(np.linalg.norm(diff) / np.linalg.norm(ref)),
    )
