"""Issue P (a full disk): gram, solve and predict --out check the free space of a local store's
filesystem against what they will write before they start; too little is a DiskSpaceError
(CLI exit 2) naming the need, the free space and the choices, with nothing written."""

from __future__ import annotations

import collections
import os
import re
import subprocess

import numpy as np
import pytest

from ntk_scale import FullyConnected, stages
from ntk_scale.cli import main
from ntk_scale.errors import DiskSpaceError
from ntk_scale.options import GramOptions, RunOptions, SolveOptions
from ntk_scale.store import space

SPEC = FullyConnected(depth=2, W_std=1.4, b_std=0.1)


def test_the_gram_writes_whole_chunks_its_x_and_its_diagonal():
    marker = space.MARKER_BYTES  # a tile's marker file: one filesystem block
    # 4096 rows, tile 2048: 3 stored tiles of 2048² float32, X (4096 x 8) and the diagonal
    assert space.gram_bytes(4096, None, 8, 2048, "float32") == (
        3 * (4 * 2048**2 + marker) + 4 * (4096 * 8 + 4096))
    # 5000 rows: 6 tiles, the edge ones stored at the full chunk's shape (Zarr's regular grid)
    assert space.gram_bytes(5000, None, 8, 2048, "float64") == (
        6 * (8 * 2048**2 + marker) + 8 * 5000 * 9)
    # K(X*, X), 100 x 5000: 3 tiles of 2048² (the tile clamped to the larger side), both X
    assert space.gram_bytes(100, 5000, 8, 2048, "float32") == (
        3 * (4 * 2048**2 + marker) + 4 * 5100 * 8)
    assert space.gram_bytes(5000, None, 8, 2048, "float32", tiles=2) == 2 * (4 * 2048**2 + marker)
    assert space.solve_bytes(1000, 3, 500) == 8 * 1000 * (500 + 15)
    assert space.solve_bytes(100, 1, 500) == 8 * 100 * (100 + 5)  # the rank is at most n
    assert space.predict_bytes(10, 4) == 320


def test_object_stores_and_small_needs_pass_unchecked(monkeypatch):
    def refuse(path):
        raise AssertionError(f"disk_usage({path}) asked for an object store")

    monkeypatch.setattr(space.shutil, "disk_usage", refuse)
    space.check_free_space("s3://bucket/run/gram.zarr", 10**15, "the Gram store", "-")
    space.check_free_space("gs://bucket/run/gram.zarr", 10**15, "the Gram store", "-")


def _fake_free(monkeypatch, free: int, total: int = 1 << 40):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(space.shutil, "disk_usage", lambda path: usage(total, total - free, free))


def test_the_message_names_the_need_the_free_space_and_the_choices(tmp_path, monkeypatch):
    _fake_free(monkeypatch, free=80 * 10**9)
    with pytest.raises(DiskSpaceError) as err:
        space.check_free_space(str(tmp_path / "run" / "gram.zarr"), 2 * 10**12, "the Gram store",
                               "use dtype float32")  # fmt: skip
    text = str(err.value)
    # 2 TB plus 1 % and 256 KiB, against 80 GB free, in the nearest existing directory
    assert "needs 2.0 TB" in text and "80.0 GB free" in text and str(tmp_path) in text
    assert "free 1.9 TB there" in text and "bucket" in text and "use dtype float32" in text
    assert isinstance(err.value, ValueError)  # the CLI's exit 2
    space.check_free_space(str(tmp_path), 70 * 10**9, "the Gram store", "-")  # fits: no error


def test_solve_and_predict_check_their_outputs_first(ray_local, tmp_path, monkeypatch):
    x = np.random.default_rng(0).normal(size=(300, 5))
    y = np.sin(x[:, 0])
    run = RunOptions(workers=2, progress=False)
    store = str(tmp_path / "g.zarr")
    stages.gram(x, SPEC, store, GramOptions(tile=128, dtype="float64"), run)
    model = str(tmp_path / "m")
    res = stages.solve(store, y, SolveOptions(rank=50, tol=1e-8), run, model_dir=model)
    _fake_free(monkeypatch, free=100_000)  # less than the headroom alone
    with pytest.raises(DiskSpaceError, match="the solve's checkpoint, sketch and model"):
        stages.solve(store, y, SolveOptions(rank=50), run, model_dir=str(tmp_path / "m2"))
    assert not (tmp_path / "m2").exists()
    with pytest.raises(DiskSpaceError, match="the predictions needs"):
        stages.predict(str(tmp_path / "m"), x[:10], run, out=str(tmp_path / "p.zarr"))
    assert not (tmp_path / "p.zarr").exists()
    monkeypatch.undo()
    expected = SPEC.kernel(x[:10], x, dtype="float64") @ res.alpha
    np.testing.assert_allclose(stages.predict(model, x[:10], run), expected, rtol=1e-8)


@pytest.fixture()
def small_disk(tmp_path):
    """A real 128 MiB filesystem (tmpfs), where this process may mount one (root)."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@pytest.mark.cluster  # mounts a filesystem (a subprocess)
def test_a_gram_too_big_for_a_real_small_disk_exits_2_and_writes_nothing(small_disk, tmp_path,
                                                                          capsys):  # fmt: skip
    x = np.random.default_rng(0).normal(size=(6000, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    store = small_disk / "run" / "gram.zarr"  # its parent does not exist: the disk is probed
    # 21 tiles of 1024² float64 (176 MB) do not fit in 128 MiB
    argv = ["gram", "--x", str(tmp_path / "x.npy"), "--store", str(store), "--dtype", "float64",
            "--tile", "1024", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the Gram store needs" in err and re.search(r"has [0-9.]+ MB free of 134\.2 MB", err)
    assert str(small_disk) in err and "nothing was written" in err
    assert list(small_disk.iterdir()) == []
