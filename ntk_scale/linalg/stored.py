"""StoredOperator: K @ P streamed from a symmetric GramStore on one machine.

Each product reads every stored tile once (see :mod:`ntk_scale.panels` for the tile arithmetic
shared with the panel actors). A pool of ``read_ahead`` threads reads the next tiles and forms
their partial products while the caller adds the previous ones into the result in tile order, so
a product is bitwise reproducible, which resuming a solve relies on. Memory: the tiles in flight
(at most read_ahead + 1) plus the (N, C) result; all arithmetic is float64.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ntk_scale.linalg.columns import kernel_columns
from ntk_scale.linalg.operators import check_block, check_indices
from ntk_scale.panels import (
    add_products,
    default_read_ahead,
    one_blas_thread,
    open_symmetric,
    stream_tiles,
    tile_products,
)
from ntk_scale.plan import Tile
from ntk_scale.store import GramStore


class StoreBacked:
    """diag and columns of an operator whose matrix lives in ``self.store`` (a GramStore)."""

    store: GramStore
    shape: tuple[int, int]
    _diag: np.ndarray | None

    def diag(self) -> np.ndarray:
        """diag(K): (N,) float64 (the store's exact diagonal, read once)."""
        if self._diag is None:
            self._diag = self.store.diagonal()
        return self._diag.copy()

    def columns(self, idx: Any) -> np.ndarray:
        """K[:, idx]. idx: (m,) int -> (N, m) float64, computed from the store's copy of X."""
        idx = check_indices(idx, self.shape[0])
        store = self.store
        return kernel_columns(
            store.meta.spec,
            store.meta.kind,
            store.meta.dtype,
            store.plan,
            lambda b: store.x_block("rows", b),
            self.diag(),
            idx,
        )


class StoredOperator(StoreBacked):
    """A GramOperator over a symmetric GramStore, streamed tile by tile on this machine.

    store_or_url: a GramStore or its URL. read_ahead: tiles read and multiplied ahead by a
    thread pool (default :func:`default_read_ahead`: one per usable core).
    bytes_read counts the tile bytes that products (and :meth:`tiles`) have read; one product
    reads ``stored_bytes``. last_product_seconds: wall time of the latest product.
    """

    def __init__(self, store_or_url: GramStore | str, read_ahead: int | None = None) -> None:
        read_ahead = default_read_ahead() if read_ahead is None else read_ahead
        if int(read_ahead) < 0:
            raise ValueError(f"read_ahead={read_ahead} must be >= 0 (tiles read ahead)")
        self.store = open_symmetric(store_or_url)
        self.read_ahead = int(read_ahead)
        self.shape = self.store.shape
        self.dtype = self.store.dtype
        self.bytes_read = 0
        self.last_product_seconds = 0.0
        self._diag: np.ndarray | None = None

    @property
    def stored_bytes(self) -> int:
        """Bytes of all stored tiles (as stored, uncompressed): what one product reads."""
        return self.store.plan.entries() * self.dtype.itemsize

    def tiles(self) -> Iterator[tuple[Tile, np.ndarray]]:
        """Every stored tile once, row-major, as (Tile, values in the storage dtype)."""
        for t, nbytes, values in stream_tiles(
            self.store, self.store.plan.tiles(), None, self.read_ahead
        ):
            self.bytes_read += nbytes
            yield t, values

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """K @ P. P: (N, C) float64 -> (N, C) float64; reads each stored tile once."""
        P = check_block(P, self.shape[0])
        start = time.perf_counter()
        out = np.zeros_like(P)
        fn = functools.partial(tile_products, P=P)
        with one_blas_thread(self.read_ahead):
            for t, nbytes, products in stream_tiles(
                self.store, self.store.plan.tiles(), fn, self.read_ahead
            ):
                self.bytes_read += nbytes
                add_products(out, t, products)
        self.last_product_seconds = time.perf_counter() - start
        return out

    def __repr__(self) -> str:
        return (
            f"StoredOperator({self.store.url!r}, shape={self.shape}, dtype={self.dtype}, "
            f"read_ahead={self.read_ahead})"
        )
