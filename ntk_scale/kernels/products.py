"""Tile-times-matrix products with the tile recomputed: K(x1, X) @ P in one jitted scan.

The one fused path shared by the matrix-free operator (square K(X, X), whose own diagonal
entries come from the exact formula) and by predict (rectangular K(X*, X)). The scan over the
column blocks of X runs inside the compiled function: one dispatch per row block, not per tile,
and the tile never leaves the device; only the (t, c) result does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_scale.kernels import fc
from ntk_scale.plan import rows_in_block

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=32)
def _compiled_panel(static: tuple[int, str], kind: str) -> Callable:
    """(hyper, x1 (t, d), i, xs (nb, t, d), ps (nb, t, c)) -> K(x1, X) @ P as (t, c) float64."""

    def panel(hyper, x1, i, xs, ps):
        p = fc.FCParams.join(static, hyper)
        exact = fc.fc_diag(p, x1, kind)
        k = jnp.arange(xs.shape[1])

        def step(acc, j):
            tile = fc.fc_tile(p, x1, xs[j], kind)
            # Block i of a square K holds K(x, x) on its diagonal: the exact formula there, as
            # in a stored Gram (a select fused into the elementwise chain costs nothing).
            tile = jnp.where((k[:, None] == k[None, :]) & (j == i), exact[:, None], tile)
            return acc + jnp.dot(tile.astype(ps.dtype), ps[j], precision=_HIGHEST), None

        acc = jnp.zeros((xs.shape[1], ps.shape[2]), dtype=ps.dtype)
        return jax.lax.scan(step, acc, jnp.arange(xs.shape[0]))[0]

    return jax.jit(panel)


def panel_matmul_function(
    spec: Any, kind: str = "ntk", dtype: str = "float32", n_rows: int | None = None
) -> Callable:
    """(x1 (t, d), i, xs (nb, t, d), ps (nb, t, c) float64) -> K(x1, X) @ P as (t, c) float64.

    xs and ps are X and P split into nb blocks of t rows (zero-padded, see
    :func:`ntk_scale.plan.split_blocks`). i: the column block equal to x1 in a square K(X, X)
    (its diagonal then comes from the exact formula), or -1 for a rectangular K(X*, X).
    n_rows: X's rows before padding (a stax network's tiles then skip the padding rows). Tiles
    are computed in ``dtype`` ("highest" matmul precision: float32 is never TF32), products and
    the sum in float64. Call it with 64-bit types enabled (``jax.enable_x64(True)``).
    The kernel's :meth:`~ntk_scale.kernels.protocol.Kernel.panel_function`.
    """
    return spec.panel_function(kind, dtype, n_rows)


def fc_panel_function(spec: Any, kind: str, dtype: str) -> Callable:
    """FullyConnected's panel product: the fused scan of :func:`_compiled_panel`."""
    static, traced = spec.params.split()
    fn = _compiled_panel(static, kind)
    hyper = tuple(np.asarray(v, dtype=dtype) for v in traced)
    return lambda x1, i, xs, ps: fn(hyper, x1, np.int32(i), xs, ps)


def network_panel_function(spec: Any, kind: str, dtype: str, n_rows: int | None) -> Callable:
    """The same product for a stax network: tile by tile (each tile is itself computed in
    chunks of pairs; the self pass of a block seen before is reused), the diagonal block i from
    the symmetric tile, padding rows of X skipped (a conv pair is expensive), in float64."""
    compiled = spec.compiled(kind, dtype)

    def real(xs: Any, j: int) -> int:
        t = xs.shape[1]
        return t if n_rows is None else rows_in_block(n_rows, t, j)

    def panel(x1, i, xs, ps):
        rows = x1.shape[0]
        x1 = spec.rows(np.asarray(x1)[: real(xs, i) if i >= 0 else rows])
        acc = np.zeros((rows, ps.shape[2]))
        for j in range(xs.shape[0]):
            m = real(xs, j)
            if j == i:
                tile = compiled.tile(x1)
            else:
                tile = compiled.tile(x1, spec.rows(np.asarray(xs[j])[:m]))
            acc[: len(x1)] += tile.astype(dtype).astype(np.float64) @ np.asarray(ps[j])[:m]
        return acc

    return panel


def bucket(c: int) -> int:
    """Columns of P padded to a power of two: PCG drops converged columns, and each new width
    would otherwise compile the panel again."""
    return 1 << max(c - 1, 0).bit_length()
