"""sizing: write-bound wall-time estimates, store throughput probes, stored vs matrix-free."""

import dataclasses
import math
import os

import fsspec
import pytest

from ntk_scale import FullyConnected, sizing
from ntk_scale.measure import probe_location
from ntk_scale.sizing import (
    choose_operator,
    measure_read_rate,
    measure_write_rate,
    plan_gram,
)

SPEC = FullyConnected(depth=2, activation="relu")
SMALL = 4 << 20


def _plan(n=4096, tile=2048, workers=2, per_tile=0.01, write=None, dtype="float32"):
    return plan_gram(
        n,
        8,
        SPEC,
        dtype=dtype,
        tile=tile,
        workers=workers,
        measure=False,
        seconds_per_tile=per_tile,
        write_bytes_per_s=write,
    )


def _record_writes(monkeypatch) -> list[str]:
    """Absolute paths of every directory made and file opened for writing via os from now on."""
    made, real_open, real_mkdir = [], os.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def spy_open(path, flags, *args, **kwargs):
        if flags & writing:
            made.append(os.path.abspath(path))
        return real_open(path, flags, *args, **kwargs)

    def spy_mkdir(path, *args, **kwargs):
        made.append(os.path.abspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "mkdir", spy_mkdir)
    return made


@pytest.mark.cluster  # starts a subprocess or Ray itself
def test_no_probe_in_cwd_and_none_left_in_store(tmp_path, monkeypatch):
    cwd, store = tmp_path / "cwd", tmp_path / "store"
    cwd.mkdir()
    store.mkdir()
    monkeypatch.chdir(cwd)
    small_write = sizing.measure_write_rate
    monkeypatch.setattr(
        sizing,
        "measure_write_rate",
        lambda url, **_: small_write(url, nbytes=SMALL, file_bytes=1 << 20),
    )
    made = _record_writes(monkeypatch)
    plan = plan_gram(64, 3, SPEC, tile=32, workers=2, measure=True, store_url=str(store))
    assert plan.seconds_per_tile > 0 and plan.write_bytes_per_s > 0
    assert plan.bound in ("compute", "write")
    assert measure_write_rate(f"file://{store}", nbytes=SMALL) > 0
    assert measure_read_rate(str(store), nbytes=SMALL) > 0
    assert len(made) >= 3 * 2  # three probe directories, each with files
    assert all(path.startswith(f"{store}{os.sep}.ntk-probe-") for path in made), made
    assert os.listdir(cwd) == []
    assert os.listdir(store) == []


def test_tile_and_byte_counts_by_hand():
    # n a multiple of tile: the upper triangle holds n (n + tile) / 2 entries.
    plan = _plan(n=4096, tile=2048)
    assert plan.tiles == 3
    assert plan.entries == 4096 * (4096 + 2048) // 2 == 4096 * 4096 - 2048 * 2048
    assert plan.bytes_on_disk == 4 * 12_582_912
    assert _plan(dtype="float64").bytes_on_disk == 8 * 12_582_912
    # otherwise: (n² + sum of the diagonal blocks' squares) / 2, blocks 2048, 2048, 904.
    ragged = _plan(n=5000, tile=2048)
    assert ragged.tiles == 6
    assert ragged.entries == (5000**2 + 2 * 2048**2 + 904**2) // 2 == 17_102_912


def test_write_bound_estimate_is_bytes_over_rate():
    plan = _plan(write=1e6, per_tile=0.01, workers=2)
    nbytes = 4 * 4096 * (4096 + 2048) // 2
    assert plan.write_seconds == nbytes / 1e6 == 50.331648
    assert plan.compute_seconds == 0.01 * 2  # 3 tiles on 2 workers: 2 rounds
    assert plan.bound == "write"
    assert plan.estimated_seconds == nbytes / 1e6
    rows = dict(plan.rows())
    assert (
        rows["estimated wall time (2 workers)"] == "50.3 s (bound by writes: 50.3 MB at 1.0 MB/s)"
    )


def test_a_local_store_adds_its_writes_to_the_compute(tmp_path):
    """Issue Q: on the local disk N = 60,000 took 33.4 s of tiles against 21.8 s of compute and
    19.0 s of writes, not their maximum: the workers' writes take the compute's cores. An
    object store's puts overlap the compute (the larger of the two)."""
    local = plan_gram(4096, 8, SPEC, workers=2, measure=False, seconds_per_tile=0.01,
                      write_bytes_per_s=1e6, store_url=str(tmp_path))  # fmt: skip
    assert local.serial_writes and local.bound == "write"
    assert local.estimated_seconds == pytest.approx(0.02 + 50.331648)
    text = dict(local.rows())["estimated wall time (2 workers)"]
    assert text == ("50.4 s (compute 0.0 s + writes 50.3 s of 50.3 MB at 1.0 MB/s, on the same "
                    "cores: bound by writes)")  # fmt: skip
    remote = dataclasses.replace(local, serial_writes=False)  # the fields stay; the text changes
    assert "bound by writes" in dict(remote.rows())["estimated wall time (2 workers)"]
    bucket = plan_gram(4096, 8, SPEC, workers=2, measure=False, seconds_per_tile=0.01,
                       write_bytes_per_s=1e6, store_url="s3://bucket/run")  # fmt: skip
    assert not bucket.serial_writes and bucket.estimated_seconds == pytest.approx(50.331648)


def test_compute_bound_when_writes_are_fast():
    plan = _plan(write=1e15, per_tile=0.01, workers=2)
    assert plan.bound == "compute"
    assert plan.estimated_seconds == plan.compute_seconds == 0.01 * 2
    assert "bound by compute" in dict(plan.rows())["estimated wall time (2 workers)"]


def test_reported_fault_is_write_bound():
    # n=60000 on 2 workers: 4.9 s of compute, but 7.4 GB at 172 MB/s take 43 s to write.
    blocks = math.ceil(60000 / 2048)
    per_tile = 4.9 / math.ceil(blocks * (blocks + 1) // 2 / 2)  # 465 tiles: 233 rounds
    plan = plan_gram(
        60000,
        25,
        SPEC,
        workers=2,
        measure=False,
        seconds_per_tile=per_tile,
        write_bytes_per_s=172e6,
    )
    assert plan.compute_seconds == pytest.approx(4.9)
    # 29 full diagonal blocks of 2048 and one of 60000 - 29 * 2048 = 608.
    assert plan.entries == (60000**2 + 29 * 2048**2 + 608**2) // 2 == 1_861_002_240
    assert plan.bound == "write"
    assert plan.estimated_seconds == 4 * 1_861_002_240 / 172e6
    text = dict(plan.rows())["estimated wall time (2 workers)"]
    assert text == "43.3 s (bound by writes: 7.4 GB at 172.0 MB/s)"


def test_without_write_rate_the_estimate_is_compute_only():
    plan = _plan(write=None, per_tile=0.01, workers=2)
    assert plan.bound is None and plan.write_seconds is None
    assert plan.estimated_seconds == 0.01 * 2
    unmeasured = _plan(per_tile=None, write=1e6)
    assert unmeasured.estimated_seconds is None and unmeasured.bound is None
    assert unmeasured.write_seconds == 4 * 12_582_912 / 1e6


def test_choose_operator_picks_recomputing_when_reads_are_slow():
    plan = _plan(n=5000, tile=2048, per_tile=1e-6, workers=3)
    pick = choose_operator(plan, read_bytes_per_s=1e3)
    assert pick.choice == "matrixfree"
    assert pick.stored_seconds == 4 * 17_102_912 / 1e3
    assert pick.matrixfree_seconds == 3 * 3 * 1e-6 / 3


def test_choose_operator_picks_reading_when_tiles_are_slow():
    plan = _plan(n=4096, tile=2048, per_tile=100.0, workers=2)
    pick = choose_operator(plan, read_bytes_per_s=1e12)
    assert pick.choice == "stored"
    assert pick.stored_seconds == 4 * 12_582_912 / 1e12
    assert pick.matrixfree_seconds == 2 * 2 * 100.0 / 2
    with pytest.raises(ValueError, match="measured plan"):
        choose_operator(_plan(per_tile=None), 1e9)


@pytest.fixture
def memory_dir():
    fs = fsspec.filesystem("memory")
    fs.mkdir("/probe-test")
    yield fs
    fs.rm("/probe-test", recursive=True)


@pytest.mark.parametrize("measure", [measure_write_rate, measure_read_rate])
def test_memory_filesystem_probe_leaves_nothing(memory_dir, measure):
    rate = measure("memory://probe-test", nbytes=SMALL)
    assert math.isfinite(rate) and rate > 0
    assert memory_dir.ls("/probe-test") == []


def test_write_probe_writes_exactly_nbytes(memory_dir, monkeypatch):
    sizes = []
    real = memory_dir.pipe_file

    def pipe_file(path, data):
        sizes.append(len(data))
        real(path, data)

    monkeypatch.setattr(memory_dir, "pipe_file", pipe_file)
    measure_write_rate("memory://probe-test", nbytes=(3 << 20) + 5, file_bytes=1 << 20)
    assert sizes == [1 << 20] * 3 + [5]


@pytest.mark.parametrize("measure", [measure_write_rate, measure_read_rate])
def test_a_store_path_not_made_yet_is_probed_in_its_nearest_existing_parent(tmp_path, measure):
    """plan --store takes the path gram would create (issue Q: it asked for mkdir -p): the
    probe runs in the nearest directory that exists, creates nothing there, and says where."""
    missing = tmp_path / "run" / "deeper" / "gram.zarr"
    assert probe_location(str(missing)) == str(tmp_path)
    assert probe_location(f"file://{missing}") == str(tmp_path)
    assert probe_location(str(tmp_path)) == str(tmp_path)
    assert probe_location("memory://bucket/run/gram.zarr") == "memory://bucket/run/gram.zarr"
    assert measure(str(missing), nbytes=SMALL) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run/, no probe left
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"")
    assert probe_location(str(a_file)) == str(tmp_path)


def test_an_unwritable_parent_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(ValueError, match="locked.*is not writable"):
            measure_write_rate(str(locked / "gram.zarr"), nbytes=SMALL)
    finally:
        locked.chmod(0o700)


def test_the_start_up_is_its_own_line_and_part_of_the_wall_time():
    """Issue Q: plan left out Ray's start and the pool's, which a user waits for (24.4 s
    estimated, 40.7 s wall). The worker's measured imports and compile, Ray's start and the
    store's write (X at the write rate) beside the hosts' start make the start-up line."""
    from ntk_scale.sizing import HOST_START_S, startup_estimate

    timed = {"imports": 1.5, "compile": 0.5}
    est = dict(startup_estimate(timed, x_bytes=10**6, write_rate=1e6, ray_start_s=2.0))
    assert est == {"imports": 1.5, "Ray start": 2.0,
                   "hosts' start beside the store": HOST_START_S + 2.0}  # fmt: skip
    # the role runs one tile of each kind at its attach: part of the hosts' start
    warm = dict(startup_estimate({**timed, "compute": 0.4, "diagonal": 0.8}, 10**6, 1e6, 2.0))
    assert warm["hosts' start beside the store"] == pytest.approx(HOST_START_S + 2.0 + 1.2)
    slow_disk = dict(startup_estimate(timed, x_bytes=10**8, write_rate=1e6, ray_start_s=0.0))
    assert slow_disk["hosts' start beside the store"] == 100.0 and slow_disk["Ray start"] == 0
    assert startup_estimate({}, 10, 1e6) == ()  # not measured: no line
    plan = dataclasses.replace(_plan(write=1e6, per_tile=0.01, workers=2),
                               startup=tuple(est.items()))  # fmt: skip
    assert plan.wall_seconds == pytest.approx(plan.estimated_seconds + 3.5 + HOST_START_S + 2.0)
    stopping = dataclasses.replace(plan, stop_seconds=2.3)
    assert stopping.wall_seconds == pytest.approx(plan.wall_seconds + 2.3)
    assert dict(stopping.rows())["estimated wall time (2 workers)"].endswith("+ Ray's stop 2.3 s")
    rows = dict(plan.rows())
    assert rows["start-up (before the first tile)"].startswith(f"{3.5 + HOST_START_S + 2.0:.1f} s")
    assert rows["estimated wall time (2 workers)"].startswith(f"{plan.wall_seconds:.1f} s: "
                                                              "start-up")  # fmt: skip
