"""StoredOperator: K @ P streamed from a symmetric GramStore on one machine.

Each product reads every stored tile once: with the upper layout a tile T = K[rows_i, cols_j],
i < j, serves both ``out[rows_i] += T @ P[cols_j]`` and ``out[rows_j] += Tᵀ @ P[rows_i]``.
A pool of ``read_ahead`` threads reads the next tiles and forms their partial products while the
caller adds the previous ones into the result in tile order (so a product is bitwise
reproducible, which resuming a solve relies on). Memory: the tiles in flight (at most
read_ahead + 1) plus the (N, C) result; all arithmetic is float64.

The helpers :func:`tiles_touching`, :func:`stream_tiles`, :func:`tile_products` and
:func:`add_products` are shared with the distributed operator, whose actors stream the tiles of
their own row blocks the same way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import threadpoolctl

from ntk_scale.linalg.operators import check_block, check_indices
from ntk_scale.plan import BlockPlan, Tile
from ntk_scale.store import GramStore

#: Rows of a tile upcast to float64 at once: 128 x 2048 x 8 B = 2 MiB, about an L2 cache.
UPCAST_ROWS = 128


def default_read_ahead() -> int:
    """Tiles in flight by default: one product thread per core this process may use (>= 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(2, cores)


def one_blas_thread(read_ahead: int) -> contextlib.AbstractContextManager:
    """BLAS limited to one thread while ``read_ahead`` >= 2 pool threads multiply tiles.

    The pool threads already use the cores; a multi-threaded BLAS under each of them
    oversubscribes (measured here: 2 threads x 2 BLAS threads 1.7 GB/s of float32 tiles,
    2 x 1 3.4 GB/s). The limit is process-wide and restored on exit.
    """
    if read_ahead < 2:
        return contextlib.nullcontext()
    return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def open_symmetric(store_or_url: GramStore | str, complete: bool = True) -> GramStore:
    """The GramStore at a URL (opened read-only), or the store given; it must be K(X, X) and,
    with ``complete``, hold every tile (the matrix-free operator needs only its copy of X)."""
    store = GramStore.open(store_or_url) if isinstance(store_or_url, str) else store_or_url
    if not store.meta.symmetric:
        raise ValueError(
            f"store {store.url} holds a rectangular K(X*, X) of shape {store.shape}; the solver "
            "needs the symmetric training Gram K(X, X): point to that store"
        )
    missing = len(store.missing()) if complete else 0
    if missing:
        raise ValueError(
            f"store {store.url} lacks {missing} of {store.plan.n_tiles} tiles; finish it first "
            "(rerun `ntk-scale gram` / compute_gram on the same path, which resumes)"
        )
    return store


def tiles_touching(plan: BlockPlan, a: int = 0, b: int | None = None) -> list[Tile]:
    """The stored tiles that hold some block of row blocks [a, b) (default: all), row-major.

    Symmetric plan: tile (i, j), i <= j, is needed when i or j lies in [a, b).
    """
    return [t for t in plan.tiles() if _owned(t.i, a, b) or _owned(t.j, a, b)]


def stream_tiles(
    store: GramStore,
    tiles: Iterable[Tile],
    fn: Callable[[Tile, np.ndarray], Any] | None = None,
    read_ahead: int = 2,
) -> Iterator[tuple[Tile, int, Any]]:
    """Yield (tile, bytes read, fn(tile, values)) in the order of ``tiles``.

    Reading a tile and applying ``fn`` (default: return the values) run together in a pool of
    ``read_ahead`` threads, so up to ``read_ahead`` tiles are read and processed while the
    caller consumes the previous result; read_ahead=0 does everything in the caller's thread.
    The results come back in order, so whatever the caller sums is summed deterministically.
    """
    fn = fn or _values

    def task(t: Tile) -> tuple[Tile, int, Any]:
        values = store.read_tile(t.i, t.j)
        return t, values.nbytes, fn(t, values)

    tiles = list(tiles)
    if read_ahead < 1:
        yield from map(task, tiles)
        return
    with concurrent.futures.ThreadPoolExecutor(read_ahead, "ntk-tile-read") as pool:
        todo = iter(tiles)
        pending = collections.deque(
            pool.submit(task, t) for t in itertools.islice(todo, read_ahead)
        )
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(task, nxt))
            yield result


def _values(t: Tile, values: np.ndarray) -> np.ndarray:
    return values


def tile_products(
    t: Tile, values: np.ndarray, P: np.ndarray, a: int = 0, b: int | None = None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The part of K @ P that tile ``t`` holds, for the rows of row blocks [a, b) (default all).

    values: t.shape, any float dtype. P: (N, C) float64. Returns (T @ P[cols], or None when row
    block t.i is not owned; Tᵀ @ P[rows], or None when t is diagonal or t.j is not owned), both
    float64. The tile is upcast ``UPCAST_ROWS`` rows at a time, so each float64 chunk serves both
    products while it is in cache, and no float64 copy of the whole tile is made.
    """
    want_rows = _owned(t.i, a, b)
    want_cols = t.i != t.j and _owned(t.j, a, b)
    c = P.shape[1]
    rows = np.empty((t.shape[0], c)) if want_rows else None
    cols = np.zeros((t.shape[1], c)) if want_cols else None
    p_cols, p_rows = P[t.cols], P[t.rows]
    for r in range(0, t.shape[0], UPCAST_ROWS):
        T = np.asarray(values[r : r + UPCAST_ROWS], dtype=np.float64)
        if rows is not None:
            rows[r : r + UPCAST_ROWS] = T @ p_cols
        if cols is not None:
            cols += T.T @ p_rows[r : r + UPCAST_ROWS]
    return rows, cols


def add_products(out: np.ndarray, t: Tile, products: tuple) -> None:
    """out += the (rows, cols) partial products of tile t (see tile_products). out: (N, C)."""
    rows, cols = products
    if rows is not None:
        out[t.rows] += rows
    if cols is not None:
        out[t.cols] += cols


def _owned(block: int, a: int, b: int | None) -> bool:
    return block >= a and (b is None or block < b)


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
        return self.store.columns(check_indices(idx, self.shape[0]))


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
