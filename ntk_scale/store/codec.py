"""The chunk format: one tile is one Zarr v3 chunk, bytes codec (little endian) then crc32c.

Tiles are encoded and decoded here, not by Zarr's codec pipeline (which ran at a fraction of the
disk rate), so the ``gram`` array's own metadata must say exactly this format: Zarr then reads
the chunks we write and we read the chunks Zarr writes (tests/test_store_format.py).
:func:`check_array_format` checks that metadata whenever a store is opened.
"""

from __future__ import annotations

from typing import Any

import crc32c
import numpy as np

from ntk_scale.errors import StoreFormatError, TileCorruptError

FORMAT_FIX = (
    "recompute the store with this version of ntk_scale, or open it with the version that wrote it"
)
_CODECS = [
    {"name": "bytes", "configuration": {"endian": "little"}},
    {"name": "crc32c", "configuration": {}},
]


def encode_chunk(values: np.ndarray, tile: int, dtype: np.dtype) -> tuple[bytes, int]:
    """Zarr v3 chunk bytes for a tile (bytes codec, little endian, then crc32c), and the crc.

    values: (<= tile, <= tile); edge tiles are padded with zeros to (tile, tile).
    """
    body, crc = chunk_body(values, tile, dtype)
    return body.tobytes() + crc.to_bytes(4, "little"), crc


def chunk_body(
    values: np.ndarray, tile: int | tuple[int, ...], dtype: np.dtype
) -> tuple[np.ndarray, int]:
    """The chunk's little-endian body, padded with zeros at edges, and its crc32c.

    tile: the chunk shape, or one side of a square (tile, tile) chunk; values: at most that.
    """
    shape = (tile, tile) if isinstance(tile, (int, np.integer)) else tuple(tile)
    le = np.dtype(dtype).newbyteorder("<")
    if values.shape == shape:
        body = np.ascontiguousarray(values, dtype=le)
    else:
        body = np.zeros(shape, dtype=le)
        body[tuple(slice(0, k) for k in values.shape)] = values
    return body, crc32c.crc32c(body)


def decode_chunk(
    raw: bytes, tile_index: tuple[int, int], tile: int | tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """The chunk's array (tile: its shape, or the side of a square one), after checking its
    size and crc32c. Raises TileCorruptError naming ``tile_index``."""
    shape = (tile, tile) if isinstance(tile, (int, np.integer)) else tuple(tile)
    le = np.dtype(dtype).newbyteorder("<")
    expected = int(np.prod(shape)) * le.itemsize + 4
    if len(raw) != expected:
        raise TileCorruptError(tile_index, f"chunk has {len(raw)} bytes, expected {expected}")
    body = memoryview(raw)[:-4]
    stored, actual = int.from_bytes(raw[-4:], "little"), crc32c.crc32c(body)
    if stored != actual:
        raise TileCorruptError(tile_index, f"crc32c {actual:#010x} != stored {stored:#010x}")
    return np.frombuffer(body, dtype=le).reshape(shape).astype(dtype, copy=False)


def check_array_format(meta_json: dict, tile: int, dtype: str) -> None:
    """Check the ``gram`` array's Zarr v3 metadata (its zarr.json, as a dict) against the format
    :func:`encode_chunk` writes for (tile, tile) chunks of ``dtype``.

    Raises StoreFormatError naming the first field that differs, what it holds and what this
    version expects.
    """
    for field, found, expected in _format_fields(meta_json, tile, dtype):
        if found != expected:
            raise StoreFormatError(
                f"gram/zarr.json field {field!r} is {found!r}, expected {expected!r}: this "
                "version of ntk_scale reads and writes tiles only as raw (tile, tile) chunks, "
                f"bytes codec (little endian) then crc32c, no compressor, no filters; {FORMAT_FIX}"
            )


def _format_fields(meta: dict, tile: int, dtype: str) -> list[tuple[str, Any, Any]]:
    """(field, value found, value expected) for every field the chunk format depends on."""
    key_encoding = meta.get("chunk_key_encoding") or {}
    return [
        ("zarr_format", meta.get("zarr_format"), 3),
        ("node_type", meta.get("node_type"), "array"),
        ("data_type", meta.get("data_type"), dtype),
        ("chunk_grid.name", _get(meta, "chunk_grid", "name"), "regular"),
        (
            "chunk_grid.configuration.chunk_shape",
            _get(meta, "chunk_grid", "configuration", "chunk_shape"),
            [tile, tile],
        ),
        ("chunk_key_encoding.name", key_encoding.get("name"), "default"),
        (
            "chunk_key_encoding.configuration.separator",
            (key_encoding.get("configuration") or {}).get("separator", "/"),
            "/",
        ),
        ("fill_value", _fill_value(meta.get("fill_value")), 0),
        ("codecs", _codecs(meta.get("codecs")), _CODECS),
        ("storage_transformers", meta.get("storage_transformers", []), []),
    ]


def _get(meta: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(meta, dict):
            return None
        meta = meta.get(key)
    return meta


def _fill_value(value: Any) -> Any:
    """0 for any numeric zero (0, 0.0, -0.0), the value itself otherwise ("NaN", None, ...)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return 0
    return value


def _codecs(codecs: Any) -> Any:
    """The codec list with absent configurations written as {} (what Zarr may omit)."""
    if not isinstance(codecs, list) or not all(isinstance(c, dict) for c in codecs):
        return codecs
    return [{"name": c.get("name"), "configuration": c.get("configuration") or {}} for c in codecs]
