"""Tiling of a Gram matrix: the ONLY place that turns block indices into slices.

A symmetric plan (K(X, X)) lists the tiles (i, j) with i <= j; tile (i, j) with i < j also serves
the block (j, i) as its transpose. A rectangular plan (K(X*, X)) lists every tile. Edge tiles are
smaller than ``tile`` in the matrix; workers pad their inputs to ``tile`` rows so that one tile
shape compiles once (:func:`pad_rows`), then crop with :attr:`Tile.shape`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

DEFAULT_TILE = 2048


@dataclasses.dataclass(frozen=True, order=True)
class Tile:
    """Block (i, j) of a plan: rows [r0, r1) and columns [c0, c1) of the matrix."""

    i: int
    j: int
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def rows(self) -> slice:
        return slice(self.r0, self.r1)

    @property
    def cols(self) -> slice:
        return slice(self.c0, self.c1)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.r1 - self.r0, self.c1 - self.c0)

    @property
    def diagonal(self) -> bool:
        return self.i == self.j

    @property
    def key(self) -> str:
        return f"{self.i}.{self.j}"


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Tiles of an (n_rows, n_cols) kernel matrix with square blocks of side ``tile``.

    symmetric: K(X, X) with n_rows == n_cols; only tiles i <= j are listed.
    """

    n_rows: int
    n_cols: int
    tile: int = DEFAULT_TILE
    symmetric: bool = True

    def __post_init__(self) -> None:
        for name in ("n_rows", "n_cols", "tile"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.symmetric and self.n_rows != self.n_cols:
            raise ValueError(
                f"a symmetric plan needs a square matrix, got {self.n_rows} x {self.n_cols}; "
                "use symmetric=False for K(X*, X)"
            )

    @classmethod
    def square(cls, n: int, tile: int = DEFAULT_TILE) -> BlockPlan:
        return cls(n, n, tile, symmetric=True)

    @property
    def row_blocks(self) -> int:
        return math.ceil(self.n_rows / self.tile)

    @property
    def col_blocks(self) -> int:
        return math.ceil(self.n_cols / self.tile)

    def row_range(self, i: int) -> tuple[int, int]:
        """Rows [start, stop) of row block i."""
        return self._span(i, self.row_blocks, self.n_rows)

    def col_range(self, j: int) -> tuple[int, int]:
        """Columns [start, stop) of column block j."""
        return self._span(j, self.col_blocks, self.n_cols)

    def _span(self, b: int, blocks: int, n: int) -> tuple[int, int]:
        if not 0 <= b < blocks:
            raise IndexError(f"block {b} out of range [0, {blocks})")
        return b * self.tile, min((b + 1) * self.tile, n)

    def tile_at(self, i: int, j: int) -> Tile:
        """The tile of block (i, j); for a symmetric plan i <= j is required."""
        if self.symmetric and i > j:
            raise IndexError(f"symmetric plan stores ({j}, {i}), not ({i}, {j})")
        return Tile(i, j, *self.row_range(i), *self.col_range(j))

    def tiles(self) -> Iterator[Tile]:
        """Every tile to compute, row-major (for symmetric plans, the upper triangle)."""
        for i in range(self.row_blocks):
            for j in range(i if self.symmetric else 0, self.col_blocks):
                yield self.tile_at(i, j)

    @property
    def n_tiles(self) -> int:
        b = self.row_blocks
        return b * (b + 1) // 2 if self.symmetric else b * self.col_blocks

    def block_of(self, i: int, j: int) -> tuple[Tile, bool]:
        """Where block (i, j) of the full matrix lives: (stored tile, transposed?)."""
        if self.symmetric and i > j:
            return self.tile_at(j, i), True
        return self.tile_at(i, j), False

    def panel_tiles(self, i: int) -> list[tuple[Tile, bool]]:
        """The blocks of row panel i, left to right, as (stored tile, transposed?)."""
        return [self.block_of(i, j) for j in range(self.col_blocks)]

    def entries(self) -> int:
        """Matrix entries computed (each stored tile counted once, padding excluded)."""
        return sum(t.shape[0] * t.shape[1] for t in self.tiles())


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Pad x (n, d) with zero rows to (rows, d); zero rows are numerically safe in every kernel."""
    n = x.shape[0]
    if n == rows:
        return x
    if n > rows:
        raise ValueError(f"cannot pad {n} rows down to {rows}")
    out = np.zeros((rows, x.shape[1]), dtype=x.dtype)
    out[:n] = x
    return out


def n_blocks(n: int, tile: int) -> int:
    """Blocks of ``tile`` rows that hold n rows: ceil(n / tile)."""
    return -(-int(n) // int(tile))


def rows_in_block(n: int, tile: int, b: int) -> int:
    """Real (unpadded) rows of block b of n rows cut into blocks of ``tile``: 0 past the end."""
    return max(0, min(int(tile), int(n) - int(b) * int(tile)))


def locate(idx: Any, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """(block, offset) of each global row index: idx (m,) ints in [0, n) -> two (m,) int64
    arrays, row idx[k] being row offset[k] of block block[k] (blocks of ``tile`` rows)."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size and idx.min() < 0:
        raise IndexError(f"row index {int(idx.min())} is negative; indices are in [0, n)")
    return idx // int(tile), idx % int(tile)


def split_blocks(a: np.ndarray, tile: int, dtype: Any) -> np.ndarray:
    """a: (n, k) -> (ceil(n / tile), tile, k) in ``dtype``, the last block zero-padded."""
    nb = n_blocks(a.shape[0], tile)
    out = np.zeros((nb * tile, a.shape[1]), dtype=dtype)
    out[: a.shape[0]] = a
    return out.reshape(nb, tile, a.shape[1])
