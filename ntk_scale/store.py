"""GramStore: a Gram matrix as tiles in a Zarr v3 group, on a local path or any fsspec URL.

Layout of a store (a directory or URL prefix)::

    zarr.json          group metadata; attributes = :class:`StoreMeta` (kernel, fingerprints, ...)
    gram/              (n_rows, n_cols) array, one chunk per tile, crc32c-checked, uncompressed
    x_rows/, x_cols/   copies of the inputs (x_cols is absent for a symmetric store), one chunk per
                       row block: workers read their rows here instead of receiving X
    diag/              exact diagonal K(x_i, x_i) of a symmetric store
    tiles/i.j.json     completion markers, written after the chunk: a tile is done iff its marker
                       exists; each records the crc32c of the tile's values and where it ran
    lock.json          the running driver's lock (with a heartbeat, for stale-lock detection)

Symmetric layout ("upper"): only tiles (i, j) with i <= j are stored; block (j, i) of the matrix is
the transpose of tile (i, j), and chunks below the block diagonal are never written. One tile is
one chunk, written by exactly one task, so no two writers ever share a chunk or a shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import crc32c
import fsspec
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from ntk_scale.kernels import FullyConnected, check_features, spec_from_dict
from ntk_scale.kernels.validate import DTYPES, KINDS, check_choice
from ntk_scale.plan import DEFAULT_TILE, BlockPlan, Tile

FORMAT_VERSION = 1
LAYOUT_UPPER = "upper: tiles (i, j) with i <= j stored; block (j, i) is tile (i, j) transposed"
LAYOUT_FULL = "full: every tile stored"
LOCK_STALE_SECONDS = 120.0
_CREATING = "ntk_scale_creating"


class StoreMismatchError(ValueError):
    """The store at this path was made for another kernel, other data or other settings."""


class StoreLockedError(RuntimeError):
    """Another live driver holds the store's lock."""


class TileCorruptError(RuntimeError):
    """A tile's bytes fail their checksum (or its marker's); ``tile`` names it."""

    def __init__(self, tile: tuple[int, int], detail: str):
        super().__init__(
            f"tile {tile} is corrupted ({detail}); run `ntk-scale verify --repair STORE` "
            "(or GramStore.invalidate + recompute) to rebuild it"
        )
        self.tile = tile


@dataclasses.dataclass(frozen=True)
class StoreMeta:
    """What a store holds; saved as the group's attributes (JSON only, never pickled)."""

    kernel: dict
    kernel_fingerprint: str
    kind: str
    dtype: str
    tile: int
    n_rows: int
    n_cols: int
    d: int
    symmetric: bool
    x_rows_fingerprint: str
    x_cols_fingerprint: str
    layout: str
    format_version: int = FORMAT_VERSION

    @property
    def spec(self) -> FullyConnected:
        return spec_from_dict(self.kernel)

    @property
    def plan(self) -> BlockPlan:
        return BlockPlan(self.n_rows, self.n_cols, self.tile, self.symmetric)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def fingerprint_rows(x: Any, dtype: str, block: int = DEFAULT_TILE, name: str = "x") -> str:
    """sha256 of x (n, d) as ``dtype`` (the values the kernel sees), read block by block.

    x may be anything sliceable (numpy, Zarr, dask). Raises ValueError on NaN / Inf rows.
    """
    n, d = x.shape
    h = hashlib.sha256(f"{n}x{d}|{dtype}|".encode())
    for r0 in range(0, n, block):
        part = np.asarray(x[r0 : r0 + block])
        try:
            check_features(part, name, dim=d)
        except ValueError as err:
            raise ValueError(_shift_row(str(err), r0)) from None
        h.update(np.ascontiguousarray(part, dtype=dtype).tobytes())
    return h.hexdigest()


def _shift_row(msg: str, offset: int) -> str:
    """Rewrite 'row k' in a block's error message as the row of the whole array."""
    import re

    return re.sub(r"row (\d+)", lambda m: f"row {int(m.group(1)) + offset}", msg, count=1)


def encode_chunk(values: np.ndarray, tile: int, dtype: np.dtype) -> tuple[bytes, int]:
    """Zarr v3 chunk bytes for a tile (bytes codec, little endian, then crc32c), and the crc."""
    body, crc = chunk_body(values, tile, dtype)
    return body.tobytes() + crc.to_bytes(4, "little"), crc


def chunk_body(values: np.ndarray, tile: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """The chunk's (tile, tile) little-endian body, padded with zeros at edges, and its crc32c."""
    le = np.dtype(dtype).newbyteorder("<")
    if values.shape == (tile, tile):
        body = np.ascontiguousarray(values, dtype=le)
    else:
        body = np.zeros((tile, tile), dtype=le)
        body[: values.shape[0], : values.shape[1]] = values
    return body, crc32c.crc32c(body)


def decode_chunk(raw: bytes, tile_index: tuple[int, int], tile: int, dtype: np.dtype) -> np.ndarray:
    """The (tile, tile) array in a chunk, after checking its size and crc32c."""
    le = np.dtype(dtype).newbyteorder("<")
    expected = tile * tile * le.itemsize + 4
    if len(raw) != expected:
        raise TileCorruptError(tile_index, f"chunk has {len(raw)} bytes, expected {expected}")
    body = memoryview(raw)[:-4]
    stored, actual = int.from_bytes(raw[-4:], "little"), crc32c.crc32c(body)
    if stored != actual:
        raise TileCorruptError(tile_index, f"crc32c {actual:#010x} != stored {stored:#010x}")
    return np.frombuffer(body, dtype=le).reshape(tile, tile).astype(dtype, copy=False)


def zarr_store(url: str, read_only: bool = False):
    """A Zarr store for a path or URL (file:// URLs become plain local stores)."""
    fs, root = fsspec.core.url_to_fs(url)
    if "://" not in url or isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return zarr.storage.LocalStore(root, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, read_only=read_only)


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


class GramStore:
    """A tiled Gram matrix in Zarr v3. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, url: str, meta: StoreMeta, mode: str = "r"):
        self.url, self.meta = url, meta
        self.fs, self.root = _fs(url)
        self._group = zarr.open_group(
            zarr_store(url, read_only=mode == "r"), mode="r" if mode == "r" else "r+"
        )
        self.gram = self._group["gram"]
        if mode != "r":
            self.fs.makedirs(f"{self.root}/tiles", exist_ok=True)
        self._x_cache: dict[tuple[str, int], np.ndarray] = {}
        self._x_lock = threading.Lock()

    # -- creation and opening -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        url: str,
        spec: FullyConnected,
        x: Any,
        x_cols: Any = None,
        kind: str = "ntk",
        dtype: str = "float32",
        tile: int = DEFAULT_TILE,
        overwrite: bool = False,
    ) -> GramStore:
        """Open the store at ``url`` for K(x, x) (or K(x, x_cols)), creating it if absent.

        x: (n, d), x_cols: (m, d) or None (symmetric). An existing store made for the same
        kernel, data and settings is reopened as it is (resume); one made for anything else is
        refused unless ``overwrite``. Inputs are validated before anything is written.
        """
        meta = _make_meta(spec, x, x_cols, kind, dtype, tile)
        if exists(url):
            found = read_meta(url)
            diff = _meta_diff(found, meta)
            if not diff:
                return cls(url, found, mode="r+")
            if not overwrite:
                raise StoreMismatchError(_mismatch_message(url, found, meta, diff))
            remove(url)
        elif _attrs(url) is not None or _fs(url)[0].exists(_fs(url)[1]):
            if not (overwrite or _is_partial(url) or _is_empty_dir(url)):
                raise StoreMismatchError(
                    f"{url} exists and is not an ntk_scale store; use a new path or --overwrite"
                )
            remove(url)
        _write_new(url, meta, spec, x, x_cols)
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
                    f"store {url} holds {key}={_short(have)}, expected {_short(want)}; "
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
        marker = {"i": tile.i, "j": tile.j, "crc32c": crc, **(info or {})}
        atomic_put(self.fs, self._marker_path(tile), json.dumps(marker).encode())

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

    def columns(self, idx: Iterable[int], source: str = "compute") -> np.ndarray:
        """K[:, idx] as (n_rows, len(idx)) float64 (what Nyström / RPCholesky preconditioners read).

        source="compute" evaluates the kernel on the store's copy of X (N x len(idx) entries, far
        cheaper than reading whole block columns for fully-connected kernels), with the exact
        diagonal where a pivot meets its own row; source="read" reads each needed block column.
        """
        if source == "compute":
            return self._computed_columns(np.asarray(list(idx), dtype=np.int64))
        if source != "read":
            raise ValueError(f"source={source!r}; use 'compute' or 'read'")
        idx = np.asarray(list(idx), dtype=np.int64)
        out = np.empty((self.meta.n_rows, idx.size), dtype=np.float64)
        tile = self.plan.tile
        for jb in np.unique(idx // tile):
            sel = np.nonzero(idx // tile == jb)[0]
            local = idx[sel] - jb * tile
            for ib in range(self.plan.row_blocks):
                r0, r1 = self.plan.row_range(ib)
                out[r0:r1, sel] = self.block(ib, int(jb))[:, local]
        return out

    def _computed_columns(self, idx: np.ndarray) -> np.ndarray:
        from ntk_scale.kernels import tile_function
        from ntk_scale.plan import pad_rows

        if not self.meta.symmetric:
            raise ValueError("columns are defined for symmetric stores K(X, X)")
        tile = self.plan.tile
        width = 1 << max(0, int(idx.size - 1).bit_length())  # few shapes: few compilations
        out = np.empty((self.meta.n_rows, idx.size), dtype=np.float64)
        if not idx.size:
            return out
        held = {int(b): self.x_block("rows", int(b)) for b in np.unique(idx // tile)}
        pivots = np.stack([held[int(i) // tile][int(i) % tile] for i in idx])
        fn = tile_function(self.meta.spec, self.meta.kind, self.meta.dtype)
        xp = pad_rows(pivots, width)
        for b in range(self.plan.row_blocks):
            r0, r1 = self.plan.row_range(b)
            block = np.asarray(fn(pad_rows(self.x_block("rows", b), tile), xp))
            out[r0:r1] = block[: r1 - r0, : idx.size]
        out[idx, np.arange(idx.size)] = self.diagonal()[idx]
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
    def _marker_path(self, tile: Tile | tuple[int, int]) -> str:
        i, j = (tile.i, tile.j) if isinstance(tile, Tile) else tile
        return f"{self.root}/tiles/{i}.{j}.json"

    def markers(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Completion markers by tile: one directory listing plus one small read each."""
        out = {}
        for path in self._marker_paths():
            info = json.loads(self.fs.cat_file(path))
            out[(info["i"], info["j"])] = info
        return out

    def _marker_paths(self) -> list[str]:
        # Markers are written by other processes (the workers); s3fs/gcsfs cache listings per
        # filesystem instance, which would hide new markers or keep removed ones.
        self.fs.invalidate_cache(f"{self.root}/tiles")
        try:
            return [
                p for p in self.fs.ls(f"{self.root}/tiles", detail=False) if p.endswith(".json")
            ]
        except FileNotFoundError:
            return []

    def completed(self) -> set[tuple[int, int]]:
        """Tiles whose marker exists (no tile bytes are read)."""
        done = set()
        for path in self._marker_paths():
            i, j = os.path.basename(path)[: -len(".json")].split(".")
            done.add((int(i), int(j)))
        return done

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
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._marker_path((i, j)))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._chunk_path(i, j))

    # -- the driver's lock ----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, stale_after: float = LOCK_STALE_SECONDS) -> Iterator[StoreLock]:
        lock = StoreLock(self.fs, f"{self.root}/lock.json", stale_after)
        lock.acquire()
        try:
            yield lock
        finally:
            lock.release()


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


class StoreLock:
    """A lock file with a heartbeat. Stale when its heartbeat is older than ``stale_after`` s, or
    when its owner ran on this host and that process is gone."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, stale_after: float):
        self.fs, self.path, self.stale_after = fs, path, stale_after
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> None:
        if self._create():
            return
        held = self._read()
        if held is not None and not self._is_stale(held):
            age = time.time() - held.get("heartbeat", 0)
            raise StoreLockedError(
                f"store is in use by pid {held.get('pid')} on {held.get('host')} "
                f"(heartbeat {age:.0f} s ago); wait for that run to finish, or if it is dead "
                f"remove {self.path} (it is treated as stale after {self.stale_after:.0f} s)"
            )
        self.took_over = held
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)
        if not self._create():
            raise StoreLockedError(f"another driver took the lock {self.path} just now; retry")

    def heartbeat(self) -> None:
        self.fs.pipe_file(self.path, json.dumps({**self.owner, "heartbeat": time.time()}).encode())

    def release(self) -> None:
        held = self._read()
        if held and held.get("pid") == self.owner["pid"] and held.get("host") == self.owner["host"]:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)

    def _create(self) -> bool:
        payload = json.dumps({**self.owner, "heartbeat": time.time()}).encode()
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            return True
        self.fs.invalidate_cache(self.path)
        if self.fs.exists(self.path):  # object stores: best effort (no exclusive create)
            return False
        self.fs.pipe_file(self.path, payload)
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):
            return None

    def _is_stale(self, held: dict[str, Any]) -> bool:
        if time.time() - float(held.get("heartbeat", 0)) > self.stale_after:
            return True
        if held.get("host") == self.owner["host"]:
            try:
                os.kill(int(held["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False


# -- helpers ------------------------------------------------------------------------------------
def atomic_put(fs: fsspec.AbstractFileSystem, path: str, *parts: Any) -> None:
    """Write a file from byte buffers so that readers see all of it or nothing (object-store puts
    are atomic already; on a local disk write a temporary file and rename it)."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, b"".join(bytes(memoryview(p).cast("B")) for p in parts))


def _attrs(url: str) -> dict[str, Any] | None:
    fs, root = _fs(url)
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
    attrs = _attrs(url) or {}
    if "ntk_scale" not in attrs:
        raise StoreMismatchError(
            f"{url} is not an ntk_scale Gram store; choose another path or pass --overwrite"
        )
    return StoreMeta.from_dict(attrs["ntk_scale"])


def _is_empty_dir(url: str) -> bool:
    fs, root = _fs(url)
    return fs.isdir(root) and not fs.ls(root, detail=False)


def remove(url: str) -> None:
    fs, root = _fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _make_meta(spec, x, x_cols, kind, dtype, tile) -> StoreMeta:
    check_choice("kind", kind, KINDS)
    check_choice("dtype", dtype, DTYPES)
    if not isinstance(spec, FullyConnected):
        raise ValueError(f"kernel must be a FullyConnected spec, got {type(spec).__name__}")
    if len(getattr(x, "shape", ())) != 2:
        check_features(x, "x")
    n, d = x.shape
    fp_rows = fingerprint_rows(x, dtype, name="x")
    if x_cols is None:
        m, fp_cols = n, fp_rows
    else:
        if len(getattr(x_cols, "shape", ())) != 2 or x_cols.shape[1] != d:
            check_features(np.asarray(x_cols[:1]), "x_cols", dim=d)
        m, fp_cols = x_cols.shape[0], fingerprint_rows(x_cols, dtype, name="x_cols")
    if not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"tile={tile!r} must be a positive integer (rows per tile side)")
    # A tile larger than the matrix would only pad: clamp it (the plan stays one tile shape).
    plan = BlockPlan(n, m, min(int(tile), max(n, m)), symmetric=x_cols is None)
    return StoreMeta(
        kernel=spec.to_dict(),
        kernel_fingerprint=spec.fingerprint(),
        kind=kind,
        dtype=dtype,
        tile=plan.tile,
        n_rows=n,
        n_cols=m,
        d=d,
        symmetric=x_cols is None,
        x_rows_fingerprint=fp_rows,
        x_cols_fingerprint=fp_cols,
        layout=LAYOUT_UPPER if x_cols is None else LAYOUT_FULL,
    )


def _meta_diff(found: StoreMeta, want: StoreMeta) -> list[str]:
    a, b = found.to_dict(), want.to_dict()
    return [k for k in b if a.get(k) != b[k] and k != "kernel"]


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 16 else text


def _mismatch_message(url: str, found: StoreMeta, want: StoreMeta, diff: list[str]) -> str:
    parts = [
        f"{k}: stored {_short(getattr(found, k))}, requested {_short(getattr(want, k))}"
        for k in diff
    ]
    return (
        f"store {url} was made for other inputs ({'; '.join(parts)}); "
        "use a new store path, or pass --overwrite (overwrite=True) to replace it"
    )


def _write_new(url: str, meta: StoreMeta, spec: FullyConnected, x: Any, x_cols: Any) -> None:
    from ntk_scale.kernels import diag_function

    group = zarr.open_group(zarr_store(url), mode="w")
    group.attrs[_CREATING] = True
    common = {"compressors": [Crc32cCodec()], "filters": None, "fill_value": 0.0}
    plan = meta.plan
    gram = group.create_array(
        "gram",
        shape=(meta.n_rows, meta.n_cols),
        chunks=(plan.tile, plan.tile),
        dtype=meta.dtype,
        **common,
    )
    gram.attrs["layout"] = meta.layout
    sources = [("x_rows", x)] + ([] if x_cols is None else [("x_cols", x_cols)])
    for name, src in sources:
        arr = group.create_array(
            name, shape=src.shape, chunks=(plan.tile, meta.d), dtype=meta.dtype, **common
        )
        for r0 in range(0, src.shape[0], plan.tile):
            arr[r0 : r0 + plan.tile] = np.asarray(src[r0 : r0 + plan.tile], dtype=meta.dtype)
    if meta.symmetric:
        diag = group.create_array(
            "diag", shape=(meta.n_rows,), chunks=(plan.tile,), dtype=meta.dtype, **common
        )
        fn = diag_function(spec, meta.kind, meta.dtype)
        for r0 in range(0, meta.n_rows, plan.tile):
            diag[r0 : r0 + plan.tile] = np.asarray(fn(np.asarray(x[r0 : r0 + plan.tile])))
    # The attributes go last: a store without them is not a store (exists() is False), so a crash
    # while copying X leaves nothing that could be mistaken for a valid store.
    group.attrs.put({"ntk_scale": meta.to_dict()})
