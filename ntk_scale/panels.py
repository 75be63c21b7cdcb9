"""Products of stored Gram tiles with a block P: the arithmetic shared by the streamed operator on
the driver and the panel actors (pure numpy over a GramStore; no Ray).

With the symmetric ("upper") layout a tile T = K[rows_i, cols_j], i < j, serves both
``out[rows_i] += T @ P[cols_j]`` and ``out[rows_j] += Tᵀ @ P[rows_i]``, so each stored tile is
read once per product. Partial products are added in tile order, so a product is bitwise
reproducible (resuming a solve relies on it).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import threadpoolctl

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
    return _blas_controller().limit(limits=1, user_api="blas")


@functools.cache
def _blas_controller() -> threadpoolctl.ThreadpoolController:
    """One scan of the loaded libraries per process: ``threadpool_limits`` rescans them on every
    call (8.6 ms with JAX and Ray loaded, on every stored product: a third of a small fit's
    time). numpy's BLAS, the one the tile products use, is loaded before this runs."""
    return threadpoolctl.ThreadpoolController()


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
            "(rerun `ntk-scale gram` / stages.gram on the same path, which resumes)"
        )
    return store


def partition_blocks(plan: BlockPlan, parts: int) -> list[tuple[int, int]]:
    """Split the row blocks into ``parts`` contiguous ranges [a, b) of near-equal entries.

    A range's weight is the entries of its row panels (rows x N): what its actor holds in memory
    (or reads per product) and multiplies. Every range gets at least one block, so fewer than
    ``parts`` ranges come back when there are fewer row blocks.
    """
    if parts < 1:
        raise ValueError(f"n_actors={parts} must be >= 1")
    blocks = plan.row_blocks
    parts = min(parts, blocks)
    cum = np.cumsum([block_rows(plan, i) * plan.n_cols for i in range(blocks)])
    targets = cum[-1] * np.arange(1, parts) / parts
    cuts = [int(np.argmin(np.abs(cum - t))) + 1 for t in targets]
    bounds = [0]
    for k, cut in enumerate(cuts):  # strictly increasing, leaving a block for each later range
        bounds.append(min(max(cut, bounds[-1] + 1), blocks - (parts - 1 - k)))
    bounds.append(blocks)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def block_rows(plan: BlockPlan, i: int) -> int:
    """Rows in row block i."""
    r0, r1 = plan.row_range(i)
    return r1 - r0


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


def panel_product(panel: np.ndarray, P: np.ndarray, plan: BlockPlan) -> np.ndarray:
    """panel @ P in float64. panel: (rows, N) in the storage dtype; P: (N, C) float64.

    A float32 panel is upcast ``UPCAST_ROWS`` rows of one tile-wide column block at a time (about
    an L2 cache of float64), never as a whole float64 copy.
    """
    if panel.dtype == np.float64:
        return panel @ P
    out = np.zeros((panel.shape[0], P.shape[1]))
    for j in range(plan.col_blocks):
        c0, c1 = plan.col_range(j)
        for r in range(0, panel.shape[0], UPCAST_ROWS):
            block = np.asarray(panel[r : r + UPCAST_ROWS, c0:c1], dtype=np.float64)
            out[r : r + UPCAST_ROWS] += block @ P[c0:c1]
    return out


def _owned(block: int, a: int, b: int | None) -> bool:
    return block >= a and (b is None or block < b)
