"""The Gram engine on a real local Ray: correctness, resume, faults, corruption, mismatch, lock."""

import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest

from ntk_scale import FullyConnected, stages
from ntk_scale.kernels import diag_blocks
from ntk_scale.linalg.stored import StoredOperator
from ntk_scale.options import GramOptions, RunOptions
from ntk_scale.scheduler import run_store
from ntk_scale.store import (
    GramStore,
    StoreLockedError,
    StoreMismatchError,
    TileCorruptError,
)

SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)
OPTS = RunOptions(workers=2, progress=False, wait_seconds=1.0)


def _x(n, d=12, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def _chunk_bytes(path) -> dict[str, bytes]:
    root = Path(path) / "gram" / "c"
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def clean_store(ray_local, tmp_path_factory):
    """N = 1,003, tile 256, float64, computed once without faults (the reference run)."""
    x = _x(1003)
    path = str(tmp_path_factory.mktemp("clean") / "gram.zarr")
    report = stages.gram(x, SPEC, path, GramOptions(dtype="float64", tile=256), OPTS)
    return x, path, report


def test_stored_gram_equals_one_call(clean_store):
    x, path, report = clean_store
    assert report.computed == report.tiles_total == 10 and report.reused == 0
    store = GramStore.open(path)
    full = store.to_dask().compute()
    expected = SPEC.kernel(x, dtype="float64")
    np.testing.assert_allclose(full, expected, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(full, full.T)  # the lower triangle is the upper, transposed
    np.testing.assert_allclose(store.row_panel(3), expected[768:], rtol=1e-12)
    cols = [0, 5, 300, 1002]
    computed = StoredOperator(store, read_ahead=0).columns(cols)  # from the store's copy of X
    np.testing.assert_allclose(computed, expected[:, cols], rtol=1e-12)
    np.testing.assert_allclose(store.columns(cols), expected[:, cols], rtol=1e-12)  # read
    np.testing.assert_array_equal(store.diagonal(), np.diag(full))


def test_float32_store_equals_one_call(ray_local, tmp_path):
    x = _x(300, seed=1)
    g32 = GramOptions(dtype="float32", tile=128)
    report = stages.gram(x, SPEC, str(tmp_path / "g32"), g32, OPTS)
    store = GramStore.open(str(tmp_path / "g32"))
    assert store.dtype == np.float32 and report.computed == 6
    np.testing.assert_allclose(store.to_dask().compute(), SPEC.kernel(x), rtol=2e-6)


def test_rerun_reuses_every_tile(clean_store):
    x, path, _ = clean_store
    report = stages.gram(x, SPEC, path, GramOptions(dtype="float64", tile=256), OPTS)
    assert (report.computed, report.reused) == (0, 10)


def test_rectangular_store(ray_local, tmp_path):
    x, xs = _x(200, seed=2), _x(130, seed=3)
    report = stages.gram(
        xs, SPEC, str(tmp_path / "rect"), GramOptions(dtype="float64", tile=64), OPTS, x_cols=x
    )
    assert report.computed == 3 * 4
    got = GramStore.open(str(tmp_path / "rect")).to_dask().compute()
    np.testing.assert_allclose(got, SPEC.kernel(xs, x, dtype="float64"), rtol=1e-12)


def test_worker_killed_mid_run(clean_store, tmp_path):
    """SIGKILL one actor's process while tiles are in flight: same bytes as the clean run."""
    x, clean_path, _ = clean_store
    killed = []

    def kill_first_worker(record):
        if not killed:
            os.kill(record["pid"], signal.SIGKILL)
            killed.append(record["pid"])

    path = str(tmp_path / "g.zarr")
    report = stages.gram(
        x, SPEC, path, GramOptions(dtype="float64", tile=256), OPTS, on_tile=kill_first_worker
    )
    assert killed and report.deaths >= 1 and report.computed == 10
    assert GramStore.open(path).verify().ok
    assert _chunk_bytes(path) == _chunk_bytes(clean_path)


def test_corrupted_chunk_is_detected_and_repaired(clean_store, tmp_path):
    import shutil

    x, clean_path, _ = clean_store
    path = tmp_path / "g.zarr"
    shutil.copytree(clean_path, path)
    chunk = path / "gram" / "c" / "1" / "2"
    raw = bytearray(chunk.read_bytes())
    raw[100:104] = bytes(b ^ 0xFF for b in raw[100:104])
    chunk.write_bytes(bytes(raw))
    store = GramStore.open(str(path))
    with pytest.raises(TileCorruptError, match=r"tile \(1, 2\)"):
        store.read_tile(1, 2)
    with pytest.raises(TileCorruptError):
        store.block(2, 1)  # the transposed block reads the same tile
    report = store.verify()
    assert report.corrupted == [(1, 2)] and report.missing == []
    store.invalidate(report.corrupted)
    rerun = run_store(GramStore.open(str(path), mode="r+"), OPTS)
    assert (rerun.computed, rerun.reused) == (1, 9)
    assert _chunk_bytes(path) == _chunk_bytes(clean_path)


def test_mismatch_is_refused(clean_store):
    x, path, _ = clean_store
    other = FullyConnected(depth=2, activation="relu", W_std=1.4, b_std=0.1)
    diag = np.ones(len(x))  # checked for its shape only: the mismatch is refused first
    with pytest.raises(StoreMismatchError, match="kernel_fingerprint.*--overwrite") as err:
        GramStore.create(path, other, x, dtype="float64", tile=256, diag=diag)
    assert other.fingerprint()[:12] in str(err.value) and SPEC.fingerprint()[:12] in str(err.value)
    x2 = x.copy()
    x2[17, 3] += 1e-9
    with pytest.raises(StoreMismatchError, match="x_rows_fingerprint"):
        GramStore.create(path, SPEC, x2, dtype="float64", tile=256, diag=diag)
    with pytest.raises(StoreMismatchError, match="tile"):
        GramStore.create(path, SPEC, x, dtype="float64", tile=128, diag=diag)


def test_overwrite_replaces_a_store(ray_local, tmp_path):
    x = _x(50)
    path = str(tmp_path / "o.zarr")
    stages.gram(x, SPEC, path, GramOptions(dtype="float64", tile=32), OPTS)
    other = FullyConnected(depth=1)
    report = stages.gram(
        x, other, path, GramOptions(dtype="float64", tile=32, overwrite=True), OPTS
    )
    assert report.computed == 3
    np.testing.assert_allclose(
        GramStore.open(path).to_dask().compute(), other.kernel(x, dtype="float64"), rtol=1e-12
    )


def test_bad_input_writes_nothing(tmp_path):
    x = _x(40)
    x[33, 1] = np.nan
    with pytest.raises(ValueError, match="row 33 contains NaN"):
        GramStore.create(str(tmp_path / "bad.zarr"), SPEC, x, tile=16, diag=np.ones(40))
    assert not (tmp_path / "bad.zarr").exists()


def test_second_driver_is_refused_and_stale_lock_taken_over(clean_store):
    _, path, _ = clean_store
    store = GramStore.open(path, mode="r+")
    with store.lock():
        with pytest.raises(StoreLockedError, match="in use by pid"):
            with store.lock():
                pass
    lock = Path(path) / "lock.json"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 999999999, "heartbeat": 1e12}))
    with store.lock() as held:  # the owner pid does not exist: stale
        assert held.took_over["pid"] == 999999999
    assert not lock.exists()


def test_memory_url_store_without_ray():
    """Any fsspec URL works: memory:// in one process, tiles written by a plain GramTileWorker."""
    from ntk_scale.roles import GramTileWorker

    x = _x(70)
    url = "memory://ntk-scale-test/gram"
    diag = diag_blocks(SPEC, x, dtype="float64", block=32)
    store = GramStore.create(url, SPEC, x, dtype="float64", tile=32, diag=diag)
    worker = GramTileWorker(url)
    for t in store.plan.tiles():
        worker.compute(t.i, t.j)
    again = GramStore.open(url)
    assert again.verify().ok and len(again.completed()) == 6
    np.testing.assert_allclose(
        again.to_dask().compute(), SPEC.kernel(x, dtype="float64"), rtol=1e-12
    )
