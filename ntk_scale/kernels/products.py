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


def panel_matmul_function(spec: Any, kind: str = "ntk", dtype: str = "float32") -> Callable:
    """(x1 (t, d), i, xs (nb, t, d), ps (nb, t, c) float64) -> K(x1, X) @ P as (t, c) float64.

    xs and ps are X and P split into nb blocks of t rows (zero-padded, see :func:`split_blocks`).
    i: the column block equal to x1 in a square K(X, X) (its diagonal then comes from the exact
    formula), or -1 for a rectangular K(X*, X). Tiles are computed in ``dtype`` ("highest"
    matmul precision: float32 is never TF32), products and the sum in float64. Call it with
    64-bit types enabled (``jax.enable_x64(True)``).
    """
    static, traced = spec.params.split()
    fn = _compiled_panel(static, kind)
    hyper = tuple(np.asarray(v, dtype=dtype) for v in traced)
    return lambda x1, i, xs, ps: fn(hyper, x1, np.int32(i), xs, ps)


def split_blocks(a: np.ndarray, tile: int, dtype: Any) -> np.ndarray:
    """a: (n, k) -> (ceil(n / tile), tile, k) in ``dtype``, the last block zero-padded."""
    nb = -(-a.shape[0] // tile)
    out = np.zeros((nb * tile, a.shape[1]), dtype=dtype)
    out[: a.shape[0]] = a
    return out.reshape(nb, tile, a.shape[1])


def bucket(c: int) -> int:
    """Columns of P padded to a power of two: PCG drops converged columns, and each new width
    would otherwise compile the panel again."""
    return 1 << max(c - 1, 0).bit_length()
