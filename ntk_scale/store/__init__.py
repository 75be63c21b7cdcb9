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

Modules: :mod:`~ntk_scale.store.gram` (the :class:`GramStore` facade), :mod:`.meta` (what a store
holds), :mod:`.codec` (the chunk format), :mod:`.markers` (completion markers), :mod:`.lock` (the
driver's lock), :mod:`.fsio` (filesystems, atomic writes).
"""

from ntk_scale.errors import (
    StoreFormatError,
    StoreLockedError,
    StoreMismatchError,
    TileCorruptError,
)
from ntk_scale.store.codec import check_array_format, chunk_body, decode_chunk, encode_chunk
from ntk_scale.store.fsio import atomic_put, url_fs, zarr_store
from ntk_scale.store.gram import GramStore, VerifyReport, exists, read_meta, remove
from ntk_scale.store.lock import LOCK_STALE_SECONDS, StoreLock
from ntk_scale.store.markers import Markers
from ntk_scale.store.meta import (
    FORMAT_VERSION,
    LAYOUT_FULL,
    LAYOUT_UPPER,
    StoreMeta,
    fingerprint_rows,
)

__all__ = [
    "FORMAT_VERSION",
    "LAYOUT_FULL",
    "LAYOUT_UPPER",
    "LOCK_STALE_SECONDS",
    "GramStore",
    "Markers",
    "StoreFormatError",
    "StoreLock",
    "StoreLockedError",
    "StoreMeta",
    "StoreMismatchError",
    "TileCorruptError",
    "VerifyReport",
    "atomic_put",
    "check_array_format",
    "chunk_body",
    "decode_chunk",
    "encode_chunk",
    "exists",
    "fingerprint_rows",
    "read_meta",
    "remove",
    "url_fs",
    "zarr_store",
]
