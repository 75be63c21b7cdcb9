"""Faults and clusters that need their own processes: multi-node Ray, a killed driver."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ntk_scale import stages
from ntk_scale.options import GramOptions, RunOptions
from ntk_scale.store import GramStore

pytestmark = pytest.mark.cluster  # every test here starts processes of its own
SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))


def test_multinode_cluster_uses_both_worker_nodes(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "multinode_gram.py"), str(tmp_path / "g.zarr"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["computed"] == 21
    used = set(result["tile_nodes"].values())
    assert used == set(result["worker_nodes"]), "tiles must run on both worker nodes, not the head"
    assert result["head_node"] not in used
    assert result["max_abs_err"] < 1e-12


def _markers(path: Path) -> int:
    d = path / "tiles"
    return len(list(d.glob("*.json"))) if d.exists() else 0


def _wait_stable(path: Path, seconds: float = 3.0, limit: float = 60.0) -> int:
    """Marker count once it has stopped changing (orphaned workers may finish a tile)."""
    deadline, last, since = time.monotonic() + limit, -1, time.monotonic()
    while time.monotonic() < deadline:
        now = _markers(path)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return now
        time.sleep(0.2)
    raise AssertionError("tiles were still being written a minute after the driver was killed")


def test_killed_driver_then_rerun_computes_only_missing_tiles(ray_local, tmp_path):
    from gram_driver import SPEC, data

    n, tile = 1500, 100  # 120 tiles
    path = tmp_path / "g.zarr"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "gram_driver.py"), str(path), str(n), str(tile)],
        env={**os.environ, "NTK_GRAM_SLEEP": "0.05"},  # 120 tiles: >= 6 s, the kill lands mid-run
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while _markers(path) < 10:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the driver made no progress"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=30)
    done_before = _wait_stable(path)
    total = 120
    assert 10 <= done_before < total, f"kill came too late to test resume ({done_before} done)"

    computed = []
    report = stages.gram(
        data(n),
        SPEC,
        str(path),
        GramOptions(dtype="float64", tile=tile),
        RunOptions(workers=2, progress=False, wait_seconds=1.0),
        on_tile=computed.append,
    )
    assert report.reused == done_before
    assert report.computed == len(computed) == total - done_before
    assert GramStore.open(str(path)).verify().ok

    clean = tmp_path / "clean.zarr"
    stages.gram(
        data(n),
        SPEC,
        str(clean),
        GramOptions(dtype="float64", tile=tile),
        RunOptions(workers=2, progress=False),
    )
    a = GramStore.open(str(path)).to_dask().compute()
    b = GramStore.open(str(clean)).to_dask().compute()
    np.testing.assert_array_equal(a, b)
