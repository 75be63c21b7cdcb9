"""GramStore: the facade over one store (creation, metadata, tiles, completion, verification).

See :mod:`ntk_scale.store` for the layout. Kernel values are never computed here: workers compute
tiles and write them with :meth:`GramStore.write_tile`, and the caller of :meth:`GramStore.create`
passes the exact diagonal (:func:`ntk_scale.kernels.diag_blocks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from ntk_scale.errors import StoreFormatError, StoreMismatchError, TileCorruptError
from ntk_scale.kernels import Kernel
from ntk_scale.plan import DEFAULT_TILE, BlockPlan, Tile, locate
from ntk_scale.store.codec import check_array_format, chunk_body, decode_chunk
from ntk_scale.store.fsio import atomic_put, sweep_temporaries, url_fs, zarr_store
from ntk_scale.store.lock import LOCK_STALE_SECONDS, StoreLock
from ntk_scale.store.markers import Markers
from ntk_scale.store.meta import (
    StoreMeta,
    check_diag,
    make_meta,
    meta_diff,
    mismatch_message,
    short,
)

_CREATING = "ntk_scale_creating"


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    total: int
    missing: list[tuple[int, int]]
    corrupted: list[tuple[int, int]]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupted

    def summary(self) -> str:
        return (
            f"{self.total - len(self.missing) - len(self.corrupted)}/{self.total} tiles ok, "
            f"{len(self.missing)} missing {self.missing[:10]}, "
            f"{len(self.corrupted)} corrupted {self.corrupted[:10]}"
        )


class GramStore:
    """A tiled Gram matrix in Zarr v3. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, url: str, meta: StoreMeta, mode: str = "r"):
        self.url, self.meta = url, meta
        self.fs, self.root = url_fs(url)
        self._check_format()
        self._group = zarr.open_group(
            zarr_store(url, read_only=mode == "r"), mode="r" if mode == "r" else "r+"
        )
        self.gram = self._group["gram"]
        self._markers = Markers(self.fs, self.root)
        if mode != "r":
            self.fs.makedirs(self._markers.dir, exist_ok=True)
        self._x_cache: dict[tuple[str, int], np.ndarray] = {}
        self._x_lock = threading.Lock()

    def _check_format(self) -> None:
        array_meta = json.loads(self.fs.cat_file(self.root + "/gram/zarr.json"))
        try:
            check_array_format(array_meta, self.meta.tile, self.meta.dtype)
        except StoreFormatError as err:
            raise StoreFormatError(f"store {self.url}: {err}") from None

    # -- creation and opening -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        url: str,
        spec: Kernel,
        x: Any,
        x_cols: Any = None,
        kind: str = "ntk",
        dtype: str = "float32",
        tile: int = DEFAULT_TILE,
        overwrite: bool = False,
        diag: Any = None,
    ) -> GramStore:
        """Open the store at ``url`` for K(x, x) (or K(x, x_cols)), creating it if absent.

        x: (n, d), x_cols: (m, d) or None (symmetric). diag: for a symmetric store the exact
        diagonal K(x_i, x_i), (n,) finite (:func:`ntk_scale.kernels.diag_blocks`), or a function
        returning it, called only when the store is new (a resumed store has its diagonal);
        None for a rectangular one. An existing store made for the same kernel, data and
        settings is reopened as it is (resume); one made for anything else is refused unless
        ``overwrite``. Inputs are validated before anything is written or removed.
        """
        meta = make_meta(spec, x, x_cols, kind, dtype, tile)
        found = _reusable(url, meta, overwrite)
        if found is not None:
            return cls(url, found, mode="r+")
        diag = check_diag(diag() if callable(diag) else diag, meta)
        remove(url)
        _write_new(url, meta, x, x_cols, diag)
        return cls(url, meta, mode="r+")

    @classmethod
    def open(cls, url: str, mode: str = "r", expect: dict[str, Any] | None = None) -> GramStore:
        """Open an existing store; ``expect`` (field -> value) is checked against its metadata."""
        if not exists(url):
            raise FileNotFoundError(
                f"no Gram store at {url!r}; create one with `ntk-scale gram` or GramStore.create"
            )
        meta = read_meta(url)
        for key, want in (expect or {}).items():
            have = getattr(meta, key)
            if have != want:
                raise StoreMismatchError(
                    f"store {url} holds {key}={short(have)}, expected {short(want)}; "
                    "point to the matching store or recompute it"
                )
        return cls(url, meta, mode=mode)

    @property
    def plan(self) -> BlockPlan:
        return self.meta.plan

    @property
    def shape(self) -> tuple[int, int]:
        return (self.meta.n_rows, self.meta.n_cols)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta.dtype)

    @property
    def fingerprint(self) -> str:
        """Identifies the matrix: kernel, kind, dtype and both inputs."""
        m = self.meta
        parts = (m.kernel_fingerprint, m.kind, m.dtype, m.x_rows_fingerprint, m.x_cols_fingerprint)
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    # -- inputs ---------------------------------------------------------------------------------
    def x_block(self, side: str, b: int) -> np.ndarray:
        """Rows of row block b (side="rows") or column block b (side="cols"): (<= tile, d)."""
        key = "x_rows" if side == "rows" or self.meta.symmetric else "x_cols"
        start, stop = self.plan.row_range(b) if side == "rows" else self.plan.col_range(b)
        with self._x_lock:  # workers may call this from two threads
            if (key, b) not in self._x_cache:
                if len(self._x_cache) > 8:
                    self._x_cache.pop(next(iter(self._x_cache)))
                self._x_cache[(key, b)] = np.asarray(self._group[key][start:stop])
            return self._x_cache[(key, b)]

    # -- tiles ----------------------------------------------------------------------------------
    def write_tile(
        self, tile: Tile, values: np.ndarray, info: dict[str, Any] | None = None
    ) -> None:
        """Write one tile (its chunk, then its completion marker). values: tile.shape.

        The chunk is encoded here exactly as Zarr's codec pipeline would (C-order little-endian
        bytes of the full chunk, edge chunks padded with the fill value 0, then the crc32c
        codec's 4-byte little-endian checksum) and written in one atomic put: Zarr's own write
        path ran at a fraction of the disk rate. tests/test_store_format.py checks that Zarr
        reads these chunks.
        """
        if values.shape != tile.shape:
            raise ValueError(f"tile {tile.i, tile.j} has shape {tile.shape}, got {values.shape}")
        body, crc = chunk_body(values, self.plan.tile, self.dtype)
        atomic_put(self.fs, self._chunk_path(tile.i, tile.j), body, crc.to_bytes(4, "little"))
        self._markers.write(tile.i, tile.j, crc, info)

    def _chunk_path(self, i: int, j: int) -> str:
        return f"{self.root}/gram/c/{i}/{j}"

    def read_tile(self, i: int, j: int) -> np.ndarray:
        """Stored tile (i, j) as written: (tile rows, tile cols). Raises TileCorruptError."""
        t = self.plan.tile_at(i, j)
        try:
            raw = self.fs.cat_file(self._chunk_path(i, j))
        except FileNotFoundError:
            raise TileCorruptError((i, j), "its chunk is missing") from None
        return decode_chunk(raw, (i, j), self.plan.tile, self.dtype)[: t.shape[0], : t.shape[1]]

    def read_crc(self, i: int, j: int) -> int:
        """The checksum stored with chunk (i, j) (its last 4 bytes)."""
        raw = self.fs.cat_file(self._chunk_path(i, j), start=-4)
        return int.from_bytes(raw, "little")

    def block(self, i: int, j: int) -> np.ndarray:
        """Block (i, j) of the full matrix, read from the tile that stores it."""
        t, transposed = self.plan.block_of(i, j)
        values = self.read_tile(t.i, t.j)
        return values.T if transposed else values

    def row_panel(self, i: int) -> np.ndarray:
        """Row panel i: K[rows of block i, :] as (panel rows, n_cols)."""
        return np.hstack([self.block(i, j) for j in range(self.plan.col_blocks)])

    def columns(self, idx: Iterable[int]) -> np.ndarray:
        """K[:, idx] as (n_rows, len(idx)) float64, read from each needed block column.

        To compute columns from the inputs instead (N x len(idx) kernel entries, far cheaper
        than reading block columns), use :func:`ntk_scale.linalg.columns.kernel_columns`.
        This is the one path that reads them.
        """
        idx = np.asarray(list(idx), dtype=np.int64)
        out = np.empty((self.meta.n_rows, idx.size), dtype=np.float64)
        col_block, offset = locate(idx, self.plan.tile)
        for jb in np.unique(col_block):
            sel = np.nonzero(col_block == jb)[0]
            local = offset[sel]
            for ib in range(self.plan.row_blocks):
                r0, r1 = self.plan.row_range(ib)
                out[r0:r1, sel] = self.block(ib, int(jb))[:, local]
        return out

    def diagonal(self) -> np.ndarray:
        """The exact diagonal (n,), float64 (symmetric stores only)."""
        if not self.meta.symmetric:
            raise ValueError("a rectangular store K(X*, X) has no diagonal")
        return np.asarray(self._group["diag"][:], dtype=np.float64)

    def to_dask(self):
        """A lazy dask array of the whole (n_rows, n_cols) matrix, one block per tile."""
        import dask
        import dask.array as da

        plan = self.plan
        rows = []
        for i in range(plan.row_blocks):
            row = []
            for j in range(plan.col_blocks):
                t, transposed = plan.block_of(i, j)
                shape = t.shape[::-1] if transposed else t.shape
                lazy = dask.delayed(self.block)(i, j)
                row.append(da.from_delayed(lazy, shape=shape, dtype=self.dtype))
            rows.append(row)
        return da.block(rows)

    # -- completion, verification, repair -------------------------------------------------------
    def markers(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Completion markers by tile: one directory listing plus one small read each."""
        return self._markers.read_all()

    def completed(self) -> set[tuple[int, int]]:
        """Tiles whose marker exists (no tile bytes are read)."""
        return self._markers.completed()

    def missing(self) -> list[Tile]:
        done = self.completed()
        return [t for t in self.plan.tiles() if (t.i, t.j) not in done]

    def verify(self) -> VerifyReport:
        """Re-read every tile: missing ones (no marker) and corrupted ones (checksum fails)."""
        markers = self.markers()
        missing, corrupted = [], []
        for t in self.plan.tiles():
            if (t.i, t.j) not in markers:
                missing.append((t.i, t.j))
                continue
            try:
                self.read_tile(t.i, t.j)
                if self.read_crc(t.i, t.j) != markers[(t.i, t.j)]["crc32c"]:
                    raise TileCorruptError((t.i, t.j), "checksum differs from its marker")
            except TileCorruptError:
                corrupted.append((t.i, t.j))
        return VerifyReport(self.plan.n_tiles, missing, corrupted)

    def invalidate(self, tiles: Iterable[tuple[int, int]]) -> None:
        """Forget tiles (marker first, then chunk) so that the next run recomputes them."""
        for i, j in tiles:
            self._markers.remove(i, j)
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._chunk_path(i, j))

    def sweep_partial_writes(self) -> int:
        """Remove what writers killed mid-write left (temporary chunk and marker files); only
        while no worker writes, i.e. by the driver holding the lock after a run."""
        return sweep_temporaries(self.fs, [f"{self.root}/gram/c", self._markers.dir])

    # -- the driver's lock ----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, stale_after: float = LOCK_STALE_SECONDS) -> Iterator[StoreLock]:
        lock = StoreLock(self.fs, f"{self.root}/lock.json", stale_after)
        lock.acquire()
        try:
            yield lock
        finally:
            lock.release()


# -- what is at a URL ---------------------------------------------------------------------------
def _attrs(url: str) -> dict[str, Any] | None:
    fs, root = url_fs(url)
    try:
        return json.loads(fs.cat_file(f"{root}/zarr.json")).get("attributes", {})
    except FileNotFoundError:
        return None


def exists(url: str) -> bool:
    """True when ``url`` holds a finished ntk_scale store (its metadata is written last)."""
    attrs = _attrs(url)
    return attrs is not None and "ntk_scale" in attrs


def _is_partial(url: str) -> bool:
    """A store whose creation was interrupted (safe to replace)."""
    attrs = _attrs(url)
    return attrs is not None and "ntk_scale" not in attrs and attrs.get(_CREATING, False)


def read_meta(url: str) -> StoreMeta:
    """The :class:`StoreMeta` of the finished store at ``url``."""
    attrs = _attrs(url) or {}
    if "ntk_scale" not in attrs:
        raise StoreMismatchError(
            f"{url} is not an ntk_scale Gram store; choose another path or pass --overwrite"
        )
    return StoreMeta.from_dict(attrs["ntk_scale"])


def _is_empty_dir(url: str) -> bool:
    fs, root = url_fs(url)
    return fs.isdir(root) and not fs.ls(root, detail=False)


def remove(url: str) -> None:
    """Delete whatever is at ``url`` (a store or a partial one); absent is fine."""
    fs, root = url_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


# -- creation -----------------------------------------------------------------------------------
def _reusable(url: str, meta: StoreMeta, overwrite: bool) -> StoreMeta | None:
    """The metadata of a matching store at ``url`` (to resume), or None when ``url`` may be
    replaced (nothing there, a partial store, or ``overwrite``).

    Raises StoreMismatchError for a store of other inputs, or anything that is not a store,
    unless ``overwrite``. Removes nothing.
    """
    if exists(url):
        found = read_meta(url)
        diff = meta_diff(found, meta)
        if not diff:
            return found
        if not overwrite:
            raise StoreMismatchError(mismatch_message(url, found, meta, diff))
    elif _attrs(url) is not None or url_fs(url)[0].exists(url_fs(url)[1]):
        if not (overwrite or _is_partial(url) or _is_empty_dir(url)):
            raise StoreMismatchError(
                f"{url} exists and is not an ntk_scale store; use a new path or --overwrite"
            )
    return None


def _write_new(url: str, meta: StoreMeta, x: Any, x_cols: Any, diag: np.ndarray | None) -> None:
    """Write a new store: the arrays (gram empty), the copies of X, diag, then the attributes."""
    group = zarr.open_group(zarr_store(url), mode="w")
    group.attrs[_CREATING] = True
    tile = meta.tile
    gram = _new_array(group, "gram", (meta.n_rows, meta.n_cols), (tile, tile), meta.dtype)
    gram.attrs["layout"] = meta.layout
    sources = [("x_rows", x)] + ([] if x_cols is None else [("x_cols", x_cols)])
    for name, src in sources:
        arr = _new_array(group, name, src.shape, (tile, meta.d), meta.dtype)
        for r0 in range(0, src.shape[0], tile):
            arr[r0 : r0 + tile] = np.asarray(src[r0 : r0 + tile], dtype=meta.dtype)
    if diag is not None:
        _new_array(group, "diag", (meta.n_rows,), (tile,), meta.dtype)[:] = diag.astype(meta.dtype)
    # The attributes go last: a store without them is not a store (exists() is False), so a crash
    # while copying X leaves nothing that could be mistaken for a valid store.
    group.attrs.put({"ntk_scale": meta.to_dict()})


def _new_array(group: zarr.Group, name: str, shape: tuple, chunks: tuple, dtype: str):
    """An array in the chunk format of :mod:`ntk_scale.store.codec` (crc32c, uncompressed)."""
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        compressors=[Crc32cCodec()],
        filters=None,
        fill_value=0.0,
    )
