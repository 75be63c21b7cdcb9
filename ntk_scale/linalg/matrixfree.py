"""MatrixFreeOperator: K @ P recomputing every kernel tile, with no Gram matrix stored anywhere.

For a fully-connected kernel a tile costs less to recompute than to read back, so a product
K @ P is computed from X alone: for each row block i, a jitted function scans the column blocks
j, computes the tile K(x_i, x_j) in the kernel dtype and multiplies it by P_j in float64 in the
same compiled function, so the tile never leaves the device and at most one tile per worker is
alive at a time. The column scan runs inside the jitted function (one dispatch per row block,
not per tile, which matters on a GPU at N = 10^6), and the diagonal entries K(x, x) come from the
exact formula, as in the Gram store, so the operator agrees with a stored K to float32 rounding.
(Blocks (i, j) and (j, i) are computed separately, so K is symmetric to float32 rounding only.)

Work is split by row panel: :class:`TileProductWorker` owns row blocks [a, b) and answers with
its rows of K @ P (or of K[:, idx]). It is a plain class: ``local=True`` runs one in this process
(one device, e.g. a single GPU); otherwise Ray actors run one each, X reaching them once through
the object store and P once per product.

Memory per worker: X (N x d in the kernel dtype), P padded (N x C float64), one tile (plus the
elementwise temporaries of one tile) and the (tile x C) accumulator.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_scale.cluster import gather
from ntk_scale.kernels import FullyConnected, check_features, fc, tile_function
from ntk_scale.kernels.validate import DTYPES, KINDS, check_choice
from ntk_scale.linalg.operators import check_block, check_indices
from ntk_scale.plan import DEFAULT_TILE, BlockPlan, pad_rows

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=32)
def _compiled_panel(static: tuple[int, str], kind: str) -> Callable:
    """(hyper, i, xs (nb, t, d), ps (nb, t, c) float64) -> K(xs[i], X) @ P as (t, c) float64."""

    def panel(hyper, i, xs, ps):
        p = fc.FCParams.join(static, hyper)
        x1 = xs[i]
        exact = fc.fc_diag(p, x1, kind)
        k = jnp.arange(xs.shape[1])

        def step(acc, j):
            tile = fc.fc_tile(p, x1, xs[j], kind)
            # K(x, x) from the exact formula, as in a stored Gram (the tile's own diagonal went
            # through arccos(≈1)); a select fused into the tile's elementwise chain costs nothing,
            # where reading the tile's diagonal back, or the store's exactly symmetric tile,
            # made the diagonal block two to six times dearer on the CPU.
            tile = jnp.where((k[:, None] == k[None, :]) & (j == i), exact[:, None], tile)
            return acc + jnp.dot(tile.astype(ps.dtype), ps[j], precision=_HIGHEST), None

        acc = jnp.zeros((xs.shape[1], ps.shape[2]), dtype=ps.dtype)
        return jax.lax.scan(step, acc, jnp.arange(xs.shape[0]))[0]

    return jax.jit(panel)


def panel_matmul_function(
    spec: FullyConnected, kind: str = "ntk", dtype: str = "float32"
) -> Callable[[int, jax.Array, jax.Array], jax.Array]:
    """(i, xs (nb, t, d) in ``dtype``, ps (nb, t, c) float64) -> row block i of K @ P, (t, c).

    xs and ps are X and P split into nb blocks of t rows (zero-padded). Each tile is computed in
    ``dtype`` ("highest" matmul precision: float32 is never TF32) and multiplied by its block of
    P in float64 inside one jitted scan; the sum over column blocks is float64. Call it with
    64-bit types enabled (``jax.enable_x64(True)``), as :class:`TileProductWorker` does.
    """
    static, traced = spec.params.split()
    fn = _compiled_panel(static, kind)
    hyper = tuple(np.asarray(v, dtype=dtype) for v in traced)
    return lambda i, xs, ps: fn(hyper, np.int32(i), xs, ps)


def split_blocks(a: np.ndarray, tile: int, dtype: Any) -> np.ndarray:
    """a: (n, k) -> (ceil(n / tile), tile, k) in ``dtype``, the last block zero-padded."""
    nb = -(-a.shape[0] // tile)
    out = np.zeros((nb * tile, a.shape[1]), dtype=dtype)
    out[: a.shape[0]] = a
    return out.reshape(nb, tile, a.shape[1])


def _bucket(c: int) -> int:
    """Columns of P padded to a power of two: PCG drops converged columns, and each new width
    would otherwise compile the panel again."""
    return 1 << max(c - 1, 0).bit_length()


class TileProductWorker:
    """Rows of K @ P and of K[:, idx] for row blocks [a, b) of X, recomputing every tile.

    spec, kind, dtype: the kernel. X: (N, d) features. tile: rows per block (also the tile side).
    a, b: the row blocks owned (default all). cpus: cores to pin this process to (Ray CPU actors,
    before any JAX computation, so that XLA's threads stay on them).
    """

    def __init__(
        self,
        spec: FullyConnected,
        X: np.ndarray,
        kind: str,
        dtype: str,
        tile: int,
        a: int = 0,
        b: int | None = None,
        cpus: list[int] | None = None,
    ) -> None:
        if cpus:
            os.sched_setaffinity(0, {c % os.cpu_count() for c in cpus})
        X = np.asarray(X)
        self.plan = BlockPlan.square(X.shape[0], tile)
        self.a, self.b = int(a), int(self.plan.row_blocks if b is None else b)
        self.r0, self.r1 = self.plan.row_range(self.a)[0], self.plan.row_range(self.b - 1)[1]
        self.dtype = np.dtype(dtype)
        self.x_host = split_blocks(X, tile, self.dtype)
        with jax.enable_x64(True):
            self.xs = jax.device_put(self.x_host)
        self.panel = panel_matmul_function(spec, kind, dtype)
        self.tile_fn = tile_function(spec, kind, dtype)
        self.diag = np.asarray(spec.diag(X[self.r0 : self.r1], kind, dtype), dtype=np.float64)
        self.products, self.seconds = 0, 0.0

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """Rows r0:r1 of K @ P. P: (N, C) float64 -> (r1 - r0, C) float64."""
        start = time.perf_counter()
        n, c = self.plan.n_rows, P.shape[1]
        padded = np.zeros((self.xs.shape[0] * self.plan.tile, _bucket(c)))
        padded[:n, :c] = P
        with jax.enable_x64(True):
            ps = jax.device_put(padded.reshape(self.xs.shape[0], self.plan.tile, -1))
            parts = [self.panel(i, self.xs, ps) for i in range(self.a, self.b)]  # async
            out = np.concatenate([np.asarray(part) for part in parts])
        self.products += 1
        self.seconds += time.perf_counter() - start
        return out[: self.r1 - self.r0, :c]

    def columns(self, idx: np.ndarray) -> np.ndarray:
        """Rows r0:r1 of K[:, idx]. idx: (m,) int -> (r1 - r0, m) float64.

        Entries K(x_k, x_k) come from the exact diagonal formula, as in a stored Gram.
        """
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((self.r1 - self.r0, len(idx)), dtype=np.float64)
        t = self.plan.tile
        for j in range(0, len(idx), t):
            cols = idx[j : j + t]
            x2 = pad_rows(self.x_host[cols // t, cols % t], min(_bucket(len(cols)), t))
            for i in range(self.a, self.b):
                r0, r1 = self.plan.row_range(i)
                tile = np.asarray(self.tile_fn(self.x_host[i], x2))
                out[r0 - self.r0 : r1 - self.r0, j : j + len(cols)] = tile[: r1 - r0, : len(cols)]
        mine = np.flatnonzero((idx >= self.r0) & (idx < self.r1))
        out[idx[mine] - self.r0, mine] = self.diag[idx[mine] - self.r0]
        return out

    def stats(self) -> dict[str, Any]:
        """Blocks and rows owned, device, pid, products computed and their total seconds."""
        return {
            "blocks": (self.a, self.b),
            "rows": (self.r0, self.r1),
            "device": str(self.xs.devices().pop()),
            "pid": os.getpid(),
            "products": self.products,
            "product_seconds": self.seconds,
        }


class MatrixFreeOperator:
    """A GramOperator K = K(X, X) whose products recompute the kernel tiles (nothing stored).

    spec: the kernel; X: (N, d) features; kind: "ntk" or "nngp"; dtype: the tiles' dtype
    (float32 tiles use "highest" matmul precision, never TF32; products and sums are float64).
    tile: block side (edge blocks are padded, so one tile shape compiles once; capped at N).
    local=True: one in-process worker on this process's default JAX device (no Ray). Otherwise
    ``n_actors`` Ray actors (default: one per GPU of the cluster, else one per CPU) each own a
    contiguous range of row blocks; X is put into the object store once, P once per product.
    address: the Ray cluster (see ensure_ray). timeout_s: limit for actor start and each call.
    diag comes from the exact diagonal formula. Close with :meth:`close` or ``with``.
    """

    def __init__(
        self,
        spec: FullyConnected,
        X: Any,
        kind: str = "ntk",
        dtype: str = "float32",
        tile: int = DEFAULT_TILE,
        n_actors: int | None = None,
        address: str | None = None,
        local: bool = False,
        timeout_s: float = 3600.0,
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
        self.timeout_s = float(timeout_s)
        self.last_product_seconds = 0.0
        self._diag = np.asarray(spec.diag(self.X, kind, dtype), dtype=np.float64)
        self._ray, self.actors, self.local = None, [], None
        if local:
            self.ranges = [(0, self.plan.row_blocks)]
            self.local = TileProductWorker(spec, self.X, kind, dtype, self.plan.tile)
        else:
            self._start_actors(n_actors, address)

    def _start_actors(self, n_actors: int | None, address: str | None) -> None:
        from ntk_scale.cluster import cluster_cpus, cluster_gpus, ensure_ray, worker_env
        from ntk_scale.linalg.distributed import partition_blocks
        from ntk_scale.scheduler import _cores

        ray = self._ray = ensure_ray(address)
        gpus = cluster_gpus(ray)
        self.ranges = partition_blocks(self.plan, n_actors or gpus or cluster_cpus(ray))
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        remote = ray.remote(TileProductWorker).options(
            **resources,
            max_restarts=0,
            runtime_env={"env_vars": worker_env(bool(gpus), None if gpus else 1)},
        )
        x_ref, cfg = ray.put(self.X), (self.kind, str(self.dtype), self.plan.tile)
        self.actors = [
            remote.remote(self.spec, x_ref, *cfg, a, b, None if gpus else _cores(k, 1, ray))
            for k, (a, b) in enumerate(self.ranges)
        ]
        try:
            self.worker_stats = self._call("stats", "starting")
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, what: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every worker, results in row order."""
        if self.local is not None:
            return [getattr(self.local, method)(*args)]
        if not self.actors:
            raise RuntimeError("this MatrixFreeOperator is closed; build a new one")
        refs = [getattr(w, method).remote(*args) for w in self.actors]
        fix = "lower tile, then build a new MatrixFreeOperator"
        return gather(self._ray, refs, self.timeout_s, "matrix-free", what, fix)

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
        """Each worker's TileProductWorker.stats(), in row order."""
        return self._call("stats", "reporting stats")

    def close(self) -> None:
        """Kill the actors (idempotent); a local operator has none."""
        for actor in self.actors:
            self._ray.kill(actor, no_restart=True)
        self.actors = []

    def __enter__(self) -> MatrixFreeOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "local" if self.local is not None else f"{len(self.actors)} actors"
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
    spec: FullyConnected,
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
    got = TileProductWorker(spec, X, kind, dtype, tile, 0, b).matmat(P)
    ref = TileProductWorker(spec, X, kind, "float64", tile, 0, b).matmat(P)
    diff = got - ref
    return PrecisionReport(
        dtype=dtype,
        rows=int(ref.shape[0]),
        max_rel=float(np.abs(diff).max() / np.abs(ref).max()),
        fro_rel=float(np.linalg.norm(diff) / np.linalg.norm(ref)),
    )
