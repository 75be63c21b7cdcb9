"""The store's chunks are plain Zarr v3: Zarr reads what GramStore writes, byte for byte."""

import json

import numpy as np
import pytest
import zarr

from ntk_scale import FullyConnected
from ntk_scale.kernels import diag_blocks
from ntk_scale.store import (
    GramStore,
    TileCorruptError,
    check_array_format,
    decode_chunk,
    encode_chunk,
)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zarr_reads_directly_written_chunks(tmp_path, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 5))
    spec = FullyConnected()
    diag = diag_blocks(spec, x, dtype=dtype)
    store = GramStore.create(str(tmp_path / "g.zarr"), spec, x, dtype=dtype, tile=32, diag=diag)
    dense = np.zeros((70, 70), dtype=dtype)
    for t in store.plan.tiles():
        values = rng.normal(size=t.shape).astype(dtype)
        store.write_tile(t, values)
        dense[t.rows, t.cols] = values
        assert np.array_equal(store.read_tile(t.i, t.j), values)
    via_zarr = zarr.open_group(str(tmp_path / "g.zarr"), mode="r")["gram"][:]
    upper = np.triu(np.ones((3, 3), bool))  # only the upper block triangle is ever written
    mask = np.kron(upper, np.ones((32, 32), bool))[:70, :70]
    np.testing.assert_array_equal(via_zarr[mask], dense[mask])
    assert (via_zarr[~mask] == 0).all()


def test_zarr_and_encode_chunk_agree_byte_for_byte(tmp_path):
    from zarr.codecs import Crc32cCodec

    values = np.random.default_rng(1).normal(size=(20, 13)).astype(np.float32)
    arr = zarr.create_array(
        str(tmp_path / "a.zarr"),
        shape=(20, 13),
        chunks=(32, 32),
        dtype="float32",
        compressors=[Crc32cCodec()],
        filters=None,
        fill_value=0.0,
    )
    arr[:, :] = values
    written = (tmp_path / "a.zarr" / "c" / "0" / "0").read_bytes()
    assert written == encode_chunk(values, 32, np.dtype("float32"))[0]
    # The metadata Zarr writes for this array is the format the store checks on every open.
    check_array_format(json.loads((tmp_path / "a.zarr" / "zarr.json").read_text()), 32, "float32")


def test_decode_rejects_truncated_and_flipped_chunks():
    values = np.ones((4, 4))
    raw, _ = encode_chunk(values, 4, np.dtype("float64"))
    assert np.array_equal(decode_chunk(raw, (0, 0), 4, np.dtype("float64")), values)
    with pytest.raises(TileCorruptError, match="bytes, expected"):
        decode_chunk(raw[:-1], (0, 0), 4, np.dtype("float64"))
    flipped = bytearray(raw)
    flipped[3] ^= 1
    with pytest.raises(TileCorruptError, match=r"tile \(2, 5\).*crc32c"):
        decode_chunk(bytes(flipped), (2, 5), 4, np.dtype("float64"))
