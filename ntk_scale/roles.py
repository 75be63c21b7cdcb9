"""Every actor role of ntk_scale, as plain classes (no Ray inside: testable in-process).

Named by what they do:

    GramTileWorker   computes tiles of one Gram store and writes each (chunk, then marker)
    PanelWorker      holds (or streams) the row panels [a, b) of a stored Gram for K @ P
    ProductWorker    K(rows, X) @ P with every tile recomputed: the matrix-free operator's rows
                     of K(X, X) @ P, and predict's K(X*, X) @ A
    NystromWorker    rows [r0, r1) of Nyström's K(X, C), recomputed block by block on every
                     call: K_bᵀ(mask_b ⊙ (K_b P)), K_bᵀ(mask_b ⊙ Y_b), K_b A, or K_bᵀK_b once

A stage attaches the role it needs to a host of the pool (:mod:`ntk_scale.pool`). Roles call
only the kernel protocol (:class:`ntk_scale.kernels.Kernel`), never ask which kernel they hold.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from typing import Any

import numpy as np

from ntk_scale.kernels.products import bucket, panel_matmul_function
from ntk_scale.linalg.columns import kernel_columns
from ntk_scale.linalg.falkon import KernelBlocks, add_gram, block_normal, block_rhs, mirror_upper
from ntk_scale.panels import (
    add_products,
    block_rows,
    open_symmetric,
    panel_product,
    stream_tiles,
    tile_products,
    tiles_touching,
)
from ntk_scale.plan import BlockPlan, rows_in_block, split_blocks
from ntk_scale.store import GramStore

#: Tests only: "i.j" makes a GramTileWorker SIGKILL its own process when it starts tile (i, j),
#: as a tile that runs its worker out of memory would.
FAULT_KILL_TILE_ENV = "NTK_SCALE_FAULT_KILL_TILE"


def _alone(fn: Any) -> Any:
    """A tile function returning (its tile,)."""
    return lambda x1, x2: (fn(x1, x2),)


def _pick(pair: Any, first: int) -> Any:
    """A pair tile function (NNGP, NTK) reordered to (pair[first], the other)."""

    def fn(x1: Any, x2: Any) -> tuple[Any, Any]:
        values = pair(x1, x2)
        return values[first], values[1 - first]

    return fn


class GramTileWorker:
    """Computes tiles of one store and writes each (chunk, then marker) itself.

    It reads its input rows from the store's copy of X, so X travels to each worker once per
    block it needs, never through the driver. The tile function is compiled once, for the one
    padded tile shape, when the role is attached. companion_url: a second store of the same
    rows and network in the other kind (the NNGP beside an NTK store): every tile is computed
    in both kinds by the same task, from the same input blocks, the companion's written first,
    so one pass over the tiles fills both.
    """

    def __init__(self, store_url: str, companion_url: str | None = None):
        self.store = GramStore.open(store_url, mode="r+")
        meta = self.store.meta
        spec, self.size = meta.spec, meta.tile
        self._fn = _alone(spec.tile_function(meta.kind, meta.dtype))
        self._sym = _alone(spec.tile_function(meta.kind, meta.dtype, symmetric=True))
        self.companion = None if companion_url is None else GramStore.open(companion_url, "r+")
        if self.companion is not None:
            if {meta.kind, self.companion.meta.kind} != {"ntk", "nngp"}:
                raise ValueError(f"a companion store holds the other kind: {meta.kind} and "
                                 f"{self.companion.meta.kind}; open an nngp beside an ntk store")
            # One pass for both kinds (Kernel.pair_tile_function): (NNGP, NTK) per tile.
            pair, pair_sym = (spec.pair_tile_function(meta.dtype),
                              spec.pair_tile_function(meta.dtype, symmetric=True))  # fmt: skip
            first = 1 if meta.kind == "ntk" else 0  # this store's kind in the pair
            self._fn = _pick(pair, first)
            self._sym = _pick(pair_sym, first)
        self._lock = threading.Lock()
        self._fault = os.environ.get(FAULT_KILL_TILE_ENV)
        self._warm_up(spec, meta)

    def _warm_up(self, spec: Any, meta: Any) -> None:
        """Compile now, not inside the first tile's timing. A kernel computed in chunks of
        pairs compiles per chunk: one chunk's worth of rows suffices (a tile can take hours)."""
        rows = spec.tile_chunk(meta.kind, meta.dtype, self.size, self.size)
        zeros = np.zeros((max(rows), meta.d), dtype=meta.dtype)
        np.asarray(self._fn(zeros[: rows[0]], zeros[: rows[1]])[0])
        if meta.symmetric:
            np.asarray(self._sym(zeros[: min(rows)], zeros[: min(rows)])[0])

    def _rows(self, side: str, b: int) -> np.ndarray:
        """Block b's inputs, padded to the tile when the kernel compiles one shape."""
        return self.store.meta.spec.pad_block(self.store.x_block(side, b), self.size)

    def _values(self, tile: Any, x1: np.ndarray, j: int) -> tuple[np.ndarray, ...]:
        """(this store's tile,) or (its tile, the companion's), cropped to the tile."""
        if tile.diagonal and self.store.meta.symmetric:
            values = self._sym(x1, x1)
        else:
            values = self._fn(x1, self._rows("cols", j))
        return tuple(np.asarray(v)[: tile.shape[0], : tile.shape[1]] for v in values)

    def compute(self, i: int, j: int) -> dict[str, Any]:
        """Compute, write and mark tile (i, j) (and the companion's). Returns where and how
        long it took."""
        tile = self.store.plan.tile_at(i, j)
        with self._lock:
            if self._fault == f"{i}.{j}":
                os.kill(os.getpid(), signal.SIGKILL)
            t0, started = time.perf_counter(), time.time()
            x1 = self._rows("rows", i)
            values, *other = self._values(tile, x1, j)
            other = other[0] if other else None
            t1 = time.perf_counter()
        info = {"node": node_id(), "host": socket.gethostname(), "pid": os.getpid()}
        info.update(compute_s=t1 - t0, start=started)
        if other is not None:
            self.companion.write_tile(tile, other, info)
        self.store.write_tile(tile, values, info)
        info.update(write_s=time.perf_counter() - t1, end=time.time(), bytes=values.nbytes)
        info["entries"] = values.size
        return {"i": i, "j": j, **info}


class PanelWorker:
    """Holds (or streams) the row panels of row blocks [a, b) of a symmetric store.

    memory_budget_bytes: the panels are kept in memory, in the storage dtype, when their bytes
    (rows x N x itemsize) fit; otherwise each product streams the tiles, ``read_ahead`` ahead.
    With the symmetric layout both paths read each needed stored tile once: tile (i, j), i <= j,
    gives block (i, j) when i is owned and block (j, i) = tileᵀ when j is owned.
    """

    def __init__(
        self, store_url: str, a: int, b: int, memory_budget_bytes: int, read_ahead: int = 2
    ) -> None:
        self.store = open_symmetric(store_url)
        plan = self.store.plan
        self.a, self.b, self.read_ahead = int(a), int(b), int(read_ahead)
        self.r0, self.r1 = plan.row_range(self.a)[0], plan.row_range(self.b - 1)[1]
        self.tiles = tiles_touching(plan, self.a, self.b)
        self.panel_bytes = (self.r1 - self.r0) * plan.n_cols * self.store.dtype.itemsize
        self.bytes_read = 0
        self.panels: list[np.ndarray] | None = None
        if self.panel_bytes <= memory_budget_bytes:
            self.panels = self._load_panels()

    def _load_panels(self) -> list[np.ndarray]:
        """Row panel i (rows_i, N) for each owned block, each needed stored tile read once."""
        plan, dtype = self.store.plan, self.store.dtype
        panels = [
            np.empty((block_rows(plan, i), plan.n_cols), dtype=dtype) for i in range(self.a, self.b)
        ]
        for t, nbytes, values in stream_tiles(self.store, self.tiles, None, self.read_ahead):
            self.bytes_read += nbytes
            if self.a <= t.i < self.b:
                panels[t.i - self.a][:, t.cols] = values
            if t.i != t.j and self.a <= t.j < self.b:
                panels[t.j - self.a][:, t.rows] = values.T
        return panels

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """Rows r0:r1 of K @ P. P: (N, C) float64 -> (r1 - r0, C) float64."""
        P = np.asarray(P, dtype=np.float64)
        if self.panels is not None:
            return np.vstack([panel_product(panel, P, self.store.plan) for panel in self.panels])
        out = np.zeros_like(P)

        def products(t, values):
            return tile_products(t, values, P, self.a, self.b)

        for t, nbytes, parts in stream_tiles(self.store, self.tiles, products, self.read_ahead):
            self.bytes_read += nbytes
            add_products(out, t, parts)
        return out[self.r0 : self.r1].copy()

    def stats(self) -> dict[str, Any]:
        """What this worker holds: its blocks, rows, panel bytes, mode and bytes read so far."""
        return {
            "blocks": (self.a, self.b),
            "rows": (self.r0, self.r1),
            "panel_bytes": self.panel_bytes,
            "in_memory": self.panels is not None,
            "bytes_read": self.bytes_read,
            "pid": os.getpid(),
        }


class ProductWorker:
    """K(rows, X) @ P with every tile recomputed, through the one fused path
    (:func:`ntk_scale.kernels.products.panel_matmul_function`).

    spec, kind, dtype: the kernel. X: (N, d) the column inputs. tile: rows per block.
    Square use (the matrix-free operator): row blocks [a, b) of X itself (default all), whose
    diagonal entries K(x, x) come from the exact formula. Rectangular use (predict): any rows
    x* (:meth:`product`), with a fixed right-hand block ``P`` (N, C) given here once.
    Memory: X and P padded (N x d in dtype, N x C float64), one tile and a (tile x C) result.
    """

    def __init__(
        self,
        spec: Any,
        X: np.ndarray,
        kind: str,
        dtype: str,
        tile: int,
        a: int = 0,
        b: int | None = None,
        P: np.ndarray | None = None,
    ) -> None:
        import jax

        X = np.asarray(X)
        self.plan = BlockPlan.square(X.shape[0], tile)
        self.a, self.b = int(a), int(self.plan.row_blocks if b is None else b)
        self.r0, self.r1 = self.plan.row_range(self.a)[0], self.plan.row_range(self.b - 1)[1]
        self.dtype = np.dtype(dtype)
        self.x_host = split_blocks(X, tile, self.dtype)
        with jax.enable_x64(True):
            self.xs = jax.device_put(self.x_host)
        self.panel = panel_matmul_function(spec, kind, dtype, X.shape[0])
        self.spec, self.kind = spec, kind
        self.diag = np.asarray(spec.diag(X[self.r0 : self.r1], kind, dtype), dtype=np.float64)
        self.fixed = None if P is None else self._device_block(np.asarray(P, dtype=np.float64))
        self.products, self.seconds = 0, 0.0
        self._lock = threading.Lock()

    def _device_block(self, P: np.ndarray) -> Any:
        """P (N, c) as (nb, tile, bucket(c)) float64 on the device."""
        import jax

        nb, t = self.xs.shape[0], self.plan.tile
        padded = np.zeros((nb * t, bucket(P.shape[1])))
        padded[: P.shape[0], : P.shape[1]] = P
        with jax.enable_x64(True):
            return jax.device_put(padded.reshape(nb, t, -1))

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """Rows r0:r1 of K(X, X) @ P. P: (N, C) float64 -> (r1 - r0, C) float64."""
        import jax

        start, c = time.perf_counter(), P.shape[1]
        with self._lock, jax.enable_x64(True):
            ps = self._device_block(np.asarray(P, dtype=np.float64))
            parts = [self.panel(self.xs[i], i, self.xs, ps) for i in range(self.a, self.b)]
            out = np.concatenate([np.asarray(part) for part in parts])  # dispatched async
        self.products += 1
        self.seconds += time.perf_counter() - start
        return out[: self.r1 - self.r0, :c]

    def product(self, x_rows: np.ndarray, c: int) -> np.ndarray:
        """K(x_rows, X) @ P for the fixed P. x_rows: (r <= tile, d) -> (r, c) float64."""
        import jax

        if self.fixed is None:
            raise ValueError("this ProductWorker has no fixed P; pass P= when creating it")
        rows = x_rows.shape[0]
        x1 = self.spec.pad_block(np.asarray(x_rows, dtype=self.dtype), self.plan.tile)
        with self._lock, jax.enable_x64(True):
            out = np.asarray(self.panel(x1, -1, self.xs, self.fixed))
        self.products += 1
        return out[:rows, :c]

    def columns(self, idx: np.ndarray) -> np.ndarray:
        """Rows r0:r1 of K[:, idx]. idx: (m,) int -> (r1 - r0, m) float64.

        Entries K(x_k, x_k) come from the exact diagonal formula, as in a stored Gram
        (:func:`ntk_scale.linalg.columns.kernel_columns`, the one path computing columns).
        """
        n, t = self.plan.n_rows, self.plan.tile

        def x_block(k: int) -> np.ndarray:
            return self.x_host[k][: rows_in_block(n, t, k)]

        spec, plan, blocks = self.spec, self.plan, (self.a, self.b)
        dtype = str(self.dtype)
        return kernel_columns(spec, self.kind, dtype, plan, x_block, self.diag, idx, blocks)

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


class NystromWorker:
    """Rows [r0, r1) of K(X, C) (Nyström's centres C), recomputed ``block`` rows at a time on
    every call (nothing kept but X's rows): the "recompute" and "normal" routes of
    :mod:`ntk_scale.nystrom`.

    spec, kind, dtype: the kernel; x_rows: (r1 - r0, d) this part's rows, r0 its first row in
    X: an ndarray, or a source read ``block`` rows at a time (:func:`ntk_scale.io.row_range`:
    a Zarr array, a dask array, an .npy file); centers: (M, d); center_index: (M,) int, where
    the centres sit in X (a centre meets its own row with the exact diagonal); mask:
    (r1 - r0, C) bool or None, the rows each of the system's C columns trains on. Memory: one
    (block, M) block (and x_rows when it came as an ndarray); the normal route's H.
    """

    def __init__(self, spec: Any, x_rows: Any, centers: np.ndarray, center_index: np.ndarray,
                 kind: str, dtype: str, block: int, r0: int = 0,
                 mask: np.ndarray | None = None) -> None:  # fmt: skip
        self.r0, self.r1 = int(r0), int(r0) + int(x_rows.shape[0])
        self.blocks = KernelBlocks(spec, x_rows, centers, kind, dtype, block,
                                   center_index=np.asarray(center_index) - self.r0)  # fmt: skip
        self.mask = None if mask is None else np.asarray(mask, dtype=bool)
        self.passes, self.seconds = 0, 0.0
        self._pass: dict[str, Any] | None = None  # the normal route's pass under way

    def _mask(self, rows: slice, columns: Any) -> np.ndarray | None:
        return None if self.mask is None else self.mask[rows, columns]

    def _each(self, fn: Any, out: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        for rows, K_b in self.blocks:
            fn(rows, K_b, out)
        self.passes, self.seconds = self.passes + 1, self.seconds + time.perf_counter() - start
        return out

    def normal(self, P: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """This part's K_bᵀ(mask[:, columns] ⊙ (K_b P)). P: (M, c) float64 -> (M, c)."""
        P = np.asarray(P, dtype=np.float64)

        def add(rows, K_b, out):
            out += block_normal(K_b, P, self._mask(rows, columns))

        return self._each(add, np.zeros_like(P))

    def rhs(self, Y: np.ndarray) -> np.ndarray:
        """This part's K_bᵀ(mask ⊙ Y). Y: (N, C) float64, all rows -> (M, C) float64."""
        Y = np.asarray(Y, dtype=np.float64)[self.r0 : self.r1]

        def add(rows, K_b, out):
            out += block_rhs(K_b, Y[rows], self._mask(rows, slice(None)))

        return self._each(add, np.zeros((self.blocks.shape[1], Y.shape[1])))

    def matmat(self, A: np.ndarray) -> np.ndarray:
        """K(x_rows, C) A. A: (M, c) float64 -> (r1 - r0, c) float64."""
        A = np.asarray(A, dtype=np.float64)

        def put(rows, K_b, out):
            out[rows] = np.asarray(K_b, dtype=np.float64) @ A

        return self._each(put, np.empty((self.blocks.shape[0], A.shape[1])))

    def normal_pass(self, reps: np.ndarray | None, Y: np.ndarray, until: float,
                    token: str) -> int:  # fmt: skip
        """Go on with the pass ``token`` of :meth:`gram_normal` up to the fraction ``until``
        (0 < until <= 1) of this part's blocks, so that the driver can show progress between
        calls. A new token starts a new pass; a replacement worker called with the same
        arguments computes its rows up to ``until`` from the start. Returns the rows done."""
        p = self._pass
        if p is None or p["token"] != token:
            m, s = self.blocks.shape[1], 1 if reps is None or self.mask is None else len(reps)
            H, b = np.zeros((s, m, m)), np.zeros((m, np.shape(Y)[1]))
            p = self._pass = {"token": token, "row": 0, "seconds": 0.0, "H": H, "b": b}
        n, block = self.blocks.shape[0], self.blocks.block
        stop = min(n, math.ceil(math.ceil(n / block) * float(until)) * block)
        Y = np.asarray(Y, dtype=np.float64)[self.r0 : self.r1]
        masks = None if reps is None or self.mask is None else self.mask[:, np.asarray(reps)]
        start = time.perf_counter()
        for rows, K_b in self.blocks.rows(p["row"], stop):
            # add_gram's products are float64 whatever the Gram's dtype; syrk reads F order
            K = np.asfortranarray(K_b, dtype=np.float64)
            for k in range(p["H"].shape[0]):
                add_gram(p["H"][k], K if masks is None else K[np.asarray(masks[rows, k], bool)])
            p["b"] += block_rhs(K, Y[rows], self._mask(rows, slice(None)))
            p["row"] = rows.stop
        p["seconds"] += time.perf_counter() - start
        return int(p["row"])

    def gram_normal(self, reps: np.ndarray | None, Y: np.ndarray, token: str | None = None,
                    rows: tuple[int, int] | None = None) -> tuple[np.ndarray, ...]:  # fmt: skip
        """One pass (or the rest of pass ``token``): (H (S, M, M), b (M, C)) float64,
        H_s = K_bᵀ(mask[:, reps[s]] ⊙ K_b) for the S columns ``reps`` whose masks are distinct
        (None: S = 1, all rows), and b = K_bᵀ(mask ⊙ Y). Y: (N, C) float64, all rows.

        rows=(r0, r1): only H[:, r0:r1] (S, r1 - r0, M), so that the driver sums the parts a
        strip at a time (the object store then holds one strip per worker, not M² per
        worker: at M = 20,000 whole parts took the node out of memory). The finished pass is
        kept until the strip ending at M is taken; a worker without it (a replacement) makes
        it again."""
        token = token or f"pass-{self.passes}"
        p = self._pass
        if p is None or p["token"] != token or not p.get("mirrored"):
            self.normal_pass(reps, Y, 1.0, token)
            p = self._pass
            for k in range(p["H"].shape[0]):
                mirror_upper(p["H"][k])
            p["mirrored"] = True
            self.passes, self.seconds = self.passes + 1, self.seconds + p["seconds"]
        m = p["H"].shape[1]
        r0, r1 = (0, m) if rows is None else (int(rows[0]), int(rows[1]))
        if not 0 <= r0 < r1 <= m:
            raise ValueError(f"rows={rows} must satisfy 0 <= r0 < r1 <= M = {m}")
        if r1 == m:
            self._pass = None  # the last strip: the worker lets go of its M² accumulator
        if (r0, r1) == (0, m):
            return p["H"], p["b"]
        return np.ascontiguousarray(p["H"][:, r0:r1]), p["b"]

    def stats(self) -> dict[str, Any]:
        """Rows, centres, passes over K(x_rows, C) and their seconds, pid."""
        return {"rows": self.blocks.shape[0], "centers": self.blocks.shape[1],
                "passes": self.passes, "seconds": self.seconds, "pid": os.getpid()}  # fmt: skip


def node_id() -> str:
    """The Ray node this process runs on (its host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # pragma: no cover - outside Ray there is no node id
        pass
    return socket.gethostname()
