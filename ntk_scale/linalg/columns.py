"""Columns K[:, idx] of a symmetric Gram matrix computed from its inputs, not read from tiles:
the one path that computes them (the stored, matrix-free and in-memory kernel operators, and
the matrix-free workers for their rows). :meth:`ntk_scale.store.GramStore.columns` is the one
that reads them from a store.

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
    blocks: tuple[int, int] | None = None,
) -> np.ndarray:
    """Rows of K[:, idx] of the symmetric K(X, X) tiled by ``plan``, computed in ``dtype``:
    those of row blocks [a, b) = ``blocks`` (default all: (N, m)), as (r1 - r0, m) float64.

    x_block(b): the rows of X in row block b, (<= plan.tile, d), for any b (the pivots' blocks
    too). diag: (r1 - r0,) the exact diagonal of those rows, placed where a pivot meets its own
    row (as in a stored Gram). idx: (m,) ints in [0, N). Each block of X is read once; columns
    are computed plan.tile at a time, and where the kernel compiles per input shape the pivots
    are padded to a power of two rows and every block to plan.tile rows
    (:meth:`Kernel.pad_block`), so few shapes compile.
    """
    if not plan.symmetric:
        raise ValueError("columns are defined for symmetric Gram matrices K(X, X)")
    a, b = (0, plan.row_blocks) if blocks is None else blocks
    r0, r1 = plan.row_range(a)[0], plan.row_range(b - 1)[1]
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    out = np.empty((r1 - r0, idx.size), dtype=np.float64)
    if not idx.size:
        return out
    held_in, offsets = locate(idx, plan.tile)
    held = {int(k): x_block(int(k)) for k in np.unique(held_in)}
    pivots = np.stack([held[int(k)][int(o)] for k, o in zip(held_in, offsets, strict=True)])
    t, fn = plan.tile, spec.tile_function(kind, dtype)
    chunks = [(j, min(j + t, idx.size)) for j in range(0, idx.size, t)]
    xps = [spec.pad_block(pivots[j0:j1], min(_pow2(j1 - j0), t)) for j0, j1 in chunks]
    for i in range(a, b):
        s0, s1 = plan.row_range(i)
        rows = spec.pad_block(held[i] if i in held else x_block(i), t)
        for (j0, j1), xp in zip(chunks, xps, strict=True):
            out[s0 - r0 : s1 - r0, j0:j1] = np.asarray(fn(rows, xp))[: s1 - s0, : j1 - j0]
    mine = np.flatnonzero((idx >= r0) & (idx < r1))
    out[idx[mine] - r0, mine] = np.asarray(diag, dtype=np.float64)[idx[mine] - r0]
    return out


def _pow2(m: int) -> int:
    """The smallest power of two >= m: few widths, few compilations."""
    return 1 << max(0, int(m - 1).bit_length())
