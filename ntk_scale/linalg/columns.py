"""Columns K[:, idx] of a symmetric Gram matrix computed from its inputs, not read from tiles.

Nyström / RPCholesky preconditioners need a few columns: N x m kernel entries are far cheaper to
compute than whole block columns are to read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ntk_scale.kernels import Kernel
from ntk_scale.plan import BlockPlan, locate


def kernel_columns(
    spec: Kernel,
    kind: str,
    dtype: str,
    plan: BlockPlan,
    x_block: Callable[[int], np.ndarray],
    diag: np.ndarray,
    idx: Any,
) -> np.ndarray:
    """K[:, idx] of the symmetric K(X, X) tiled by ``plan``: (N, m) float64, computed in ``dtype``.

    x_block(b): the rows of X in row block b, (<= plan.tile, d). diag: (N,) the exact diagonal,
    placed where a pivot meets its own row (as in a stored Gram). idx: (m,) ints in [0, N).
    Each block of X holding pivots is read once; where the kernel compiles per input shape
    the pivots are padded to a power of two rows and every block to plan.tile rows
    (:meth:`Kernel.pad_block`), so few shapes compile.
    """
    if not plan.symmetric:
        raise ValueError("columns are defined for symmetric Gram matrices K(X, X)")
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    out = np.empty((plan.n_rows, idx.size), dtype=np.float64)
    if not idx.size:
        return out
    blocks, offsets = locate(idx, plan.tile)
    held = {int(b): x_block(int(b)) for b in np.unique(blocks)}
    pivots = np.stack([held[int(b)][int(o)] for b, o in zip(blocks, offsets, strict=True)])
    width = 1 << max(0, int(idx.size - 1).bit_length())  # few shapes: few compilations
    xp = spec.pad_block(pivots, width)
    fn = spec.tile_function(kind, dtype)
    for b in range(plan.row_blocks):
        r0, r1 = plan.row_range(b)
        block = np.asarray(fn(spec.pad_block(x_block(b), plan.tile), xp))
        out[r0:r1] = block[: r1 - r0, : idx.size]
    out[idx, np.arange(idx.size)] = np.asarray(diag, dtype=np.float64)[idx]
    return out
