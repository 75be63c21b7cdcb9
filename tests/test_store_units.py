"""The store's parts on their own, without Ray: array format, markers, lock, create, columns."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest

from ntk_scale import FullyConnected
from ntk_scale.kernels import diag_blocks, tile_function
from ntk_scale.linalg.columns import kernel_columns
from ntk_scale.plan import BlockPlan, pad_rows
from ntk_scale.store import (
    GramStore,
    Markers,
    StoreFormatError,
    StoreLock,
    StoreLockedError,
    check_array_format,
)

SPEC = FullyConnected(depth=2, activation="relu", W_std=1.4, b_std=0.1)


def _x(n: int, d: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def _store(tmp_path, dtype: str = "float32", n: int = 70, tile: int = 32) -> GramStore:
    x = _x(n)
    url = str(tmp_path / "g.zarr")
    return GramStore.create(url, SPEC, x, dtype=dtype, tile=tile, diag=diag_blocks(SPEC, x))


# -- the gram array's format --------------------------------------------------------------------
def test_check_array_format_accepts_what_this_code_writes(tmp_path):
    for dtype in ("float32", "float64"):
        store = _store(tmp_path / dtype, dtype=dtype)
        meta = json.loads((tmp_path / dtype / "g.zarr" / "gram" / "zarr.json").read_text())
        check_array_format(meta, 32, dtype)
        assert GramStore.open(store.url).meta.dtype == dtype


def _gzip(meta):
    meta["codecs"].insert(1, {"name": "gzip", "configuration": {"level": 5}})


def _chunks(meta):
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [16, 16]


def _dtype(meta):
    meta["data_type"] = "float64"


def _fill(meta):
    meta["fill_value"] = "NaN"


def _big_endian(meta):
    meta["codecs"][0]["configuration"]["endian"] = "big"


def _no_crc(meta):
    meta["codecs"] = meta["codecs"][:1]


@pytest.mark.parametrize(
    ("edit", "field", "found"),
    [
        (_gzip, "codecs", "gzip"),
        (_chunks, "chunk_shape", "[16, 16]"),
        (_dtype, "data_type", "float64"),
        (_fill, "fill_value", "NaN"),
        (_big_endian, "codecs", "big"),
        (_no_crc, "codecs", "bytes"),
    ],
)
def test_a_gram_array_in_another_format_is_refused_on_open(tmp_path, edit, field, found):
    store = _store(tmp_path)  # float32, tile 32
    path = tmp_path / "g.zarr" / "gram" / "zarr.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match=field) as err:
        check_array_format(meta, 32, "float32")
    message = str(err.value)
    assert found in message and "expected" in message
    assert "recompute the store with this version of ntk_scale" in message
    for mode in ("r", "r+"):
        with pytest.raises(StoreFormatError, match=f"store {store.url}: .*{field}"):
            GramStore.open(store.url, mode=mode)


def test_check_array_format_wants_the_store_tile_and_dtype(tmp_path):
    _store(tmp_path)
    meta = json.loads((tmp_path / "g.zarr" / "gram" / "zarr.json").read_text())
    with pytest.raises(StoreFormatError, match=r"chunk_shape.*\[32, 32\].*expected \[64, 64\]"):
        check_array_format(meta, 64, "float32")
    with pytest.raises(StoreFormatError, match="data_type.*'float32', expected 'float64'"):
        check_array_format(meta, 32, "float64")


# -- completion markers -------------------------------------------------------------------------
def test_markers_write_complete_and_remove(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "store")
    markers = Markers(fs, root)
    assert markers.completed() == set() and markers.read_all() == {}  # no tiles/ directory yet
    markers.write(0, 1, 0xDEADBEEF, {"pid": 7})
    markers.write(2, 2, 5)
    assert markers.path(0, 1) == f"{root}/tiles/0.1.json"
    assert Markers(fs, root).completed() == {(0, 1), (2, 2)}  # another instance sees them
    assert markers.read_all()[(0, 1)] == {"i": 0, "j": 1, "crc32c": 0xDEADBEEF, "pid": 7}
    markers.remove(0, 1)
    markers.remove(0, 1)  # absent is fine
    assert markers.completed() == {(2, 2)}
    assert not list((tmp_path / "store" / "tiles").glob("*.tmp-*"))  # atomic writes left nothing


def test_markers_on_an_fsspec_url():
    fs = fsspec.filesystem("memory")
    root = "/ntk-scale-units/markers"
    writer, reader = Markers(fs, root), Markers(fs, root)
    assert reader.completed() == set()
    writer.write(3, 4, 1)
    assert reader.completed() == {(3, 4)}  # the listing cache is invalidated
    writer.remove(3, 4)
    assert reader.completed() == set()


# -- the driver's lock --------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_acquire_refuse_release(tmp_path):
    fs, path = fsspec.filesystem("file"), str(tmp_path / "lock.json")
    first, second = StoreLock(fs, path, 120.0), StoreLock(fs, path, 120.0)
    first.acquire()
    assert first.took_over is None
    with pytest.raises(StoreLockedError, match=r"in use by pid \d+ .*wait for that run"):
        second.acquire()
    first.heartbeat()
    assert json.loads(fs.cat_file(path))["heartbeat"] <= time.time()
    first.release()
    assert not fs.exists(path)
    second.acquire()
    assert second.took_over is None
    second.release()


@pytest.mark.cluster  # starts a subprocess or Ray itself
def test_lock_held_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    fs, path = fsspec.filesystem("file"), str(tmp_path / "lock.json")
    pid = _dead_pid()
    held = {"host": socket.gethostname(), "pid": pid, "heartbeat": time.time()}
    (tmp_path / "lock.json").write_text(json.dumps(held))
    lock = StoreLock(fs, path, 120.0)
    lock.acquire()
    assert lock.took_over["pid"] == pid
    assert json.loads(fs.cat_file(path))["pid"] == lock.owner["pid"]
    lock.release()


def test_lock_of_another_host_is_stale_only_after_its_heartbeat_ages(tmp_path):
    fs, path = fsspec.filesystem("file"), str(tmp_path / "lock.json")
    fresh = {"host": "elsewhere.invalid", "pid": 1, "heartbeat": time.time()}
    (tmp_path / "lock.json").write_text(json.dumps(fresh))
    with pytest.raises(StoreLockedError, match="elsewhere.invalid"):
        StoreLock(fs, path, 120.0).acquire()
    (tmp_path / "lock.json").write_text(json.dumps({**fresh, "heartbeat": time.time() - 600}))
    lock = StoreLock(fs, path, 120.0)
    lock.acquire()
    assert lock.took_over["host"] == "elsewhere.invalid"
    lock.release()


# -- create: the diagonal is the caller's -------------------------------------------------------
@pytest.mark.parametrize(
    ("diag", "match"),
    [
        (None, r"needs diag=.*shape \(40,\).*diag_blocks\(spec, x, kind, dtype\)"),
        (np.ones(39), r"shape \(39,\).*expected .*\(40,\).*diag_blocks"),
        (np.ones((40, 1)), r"shape \(40, 1\).*expected .*\(40,\).*diag_blocks"),
        (np.array(["a"] * 40), r"expected .*\(40,\).*diag_blocks"),
        (np.r_[np.ones(39), np.nan], r"diag\[39\] is nan.*finite.*diag_blocks"),
    ],
)
def test_create_refuses_a_missing_or_wrong_diag_and_writes_nothing(tmp_path, diag, match):
    path = tmp_path / "g.zarr"
    with pytest.raises(ValueError, match=match):
        GramStore.create(str(path), SPEC, _x(40), dtype="float64", tile=16, diag=diag)
    assert not path.exists()


def test_create_refuses_a_diag_for_a_rectangular_store(tmp_path):
    path = tmp_path / "rect.zarr"
    with pytest.raises(ValueError, match="diag=None with x_cols"):
        GramStore.create(str(path), SPEC, _x(10), x_cols=_x(40), tile=16, diag=np.ones(10))
    assert not path.exists()
    store = GramStore.create(str(path), SPEC, _x(10), x_cols=_x(40), tile=16)
    assert store.shape == (10, 40) and not store.meta.symmetric


def test_create_writes_the_given_diag(tmp_path):
    x = _x(40)
    diag = np.linspace(1.0, 2.0, 40)
    store = GramStore.create(str(tmp_path / "g.zarr"), SPEC, x, dtype="float64", tile=16, diag=diag)
    np.testing.assert_array_equal(store.diagonal(), diag)
    reopened = GramStore.create(store.url, SPEC, x, dtype="float64", tile=16, diag=diag)
    np.testing.assert_array_equal(reopened.diagonal(), diag)  # resumed as it is


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_diag_blocks_equals_the_dense_diagonal(kind):
    x = _x(45, seed=3)
    want = np.diag(SPEC.kernel(x, kind=kind, dtype="float64"))
    got = diag_blocks(SPEC, x, kind, "float64", block=16)  # three blocks, the last one padded
    assert got.shape == (45,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    np.testing.assert_allclose(diag_blocks(SPEC, x, kind, "float32"), want, rtol=1e-5)


def test_diag_blocks_with_the_store_tile_is_bitwise_the_diagonal_tiles():
    """Blocks padded to the tile have the diagonal tiles' shape: the same bits (XLA's last bit
    can depend on the array shape)."""
    x, tile = _x(70, seed=7), 32
    sym = tile_function(SPEC, "ntk", "float64", symmetric=True)
    plan = BlockPlan.square(70, tile)
    want = np.concatenate(
        [
            np.diag(np.asarray(sym(xb, xb)))[: r1 - r0]
            for r0, r1 in (plan.row_range(b) for b in range(plan.row_blocks))
            for xb in [pad_rows(x[r0:r1], tile)]
        ]
    )
    np.testing.assert_array_equal(diag_blocks(SPEC, x, "ntk", "float64", block=tile), want)
    assert diag_blocks(SPEC, x[:10], "ntk", "float64", block=tile).shape == (10,)  # clamped


# -- columns: computed (linalg) and read (store) ------------------------------------------------
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_kernel_columns_equal_the_dense_kernel(tmp_path, kind):
    x = _x(70, seed=4)
    diag = diag_blocks(SPEC, x, kind, "float64")
    url = str(tmp_path / "g.zarr")
    store = GramStore.create(url, SPEC, x, kind=kind, dtype="float64", tile=32, diag=diag)
    dense = FullyConnected(depth=2, activation="relu", W_std=1.4, b_std=0.1).kernel(
        x, kind=kind, dtype="float64"
    )
    idx = np.array([0, 5, 33, 69, 64, 5])

    def x_block(b):
        return store.x_block("rows", b)

    got = kernel_columns(SPEC, kind, "float64", store.plan, x_block, store.diagonal(), idx)
    assert got.shape == (70, 6) and got.dtype == np.float64
    np.testing.assert_allclose(got, dense[:, idx], rtol=1e-12, atol=0)
    empty = kernel_columns(SPEC, kind, "float64", store.plan, x_block, diag, [])
    assert empty.shape == (70, 0)


def test_kernel_columns_refuse_a_rectangular_plan():
    with pytest.raises(ValueError, match="symmetric"):
        kernel_columns(SPEC, "ntk", "float64", BlockPlan(10, 40, 16), None, None, [0])


def test_store_columns_read_the_stored_tiles(tmp_path):
    x = _x(70, seed=5)
    store = GramStore.create(
        str(tmp_path / "g.zarr"), SPEC, x, dtype="float64", tile=32, diag=np.ones(70)
    )
    K = np.random.default_rng(6).normal(size=(70, 70))
    K = K + K.T  # any symmetric matrix: the columns come from the tiles, not the kernel
    for t in store.plan.tiles():
        store.write_tile(t, K[t.rows, t.cols])
    idx = [69, 0, 40, 33, 31]
    np.testing.assert_array_equal(store.columns(idx), K[:, idx])
