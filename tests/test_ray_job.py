"""`ray job submit` against a real Ray head on 127.0.0.1 with token authentication."""

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from oracles import dense_predictions, relative_max_error
from processes import stop_group

from ntk_scale.kernels import FullyConnected

BIN = Path(sys.executable).parent


def _free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` in its own process group; the group is ended at teardown."""
    gcs, dash, client, agent_http, agent_grpc, metrics, env_agent, nm, om = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # unix socket paths must stay short
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "JAX_PLATFORMS": "cpu",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
    ]
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_jobs_api(address, env, head, tmp_path / "head.log")
        yield address, env
    finally:
        # SIGTERM, then SIGKILL after 3 s: on SIGTERM `ray start --block` took over 20 s to end
        stop_group(head, timeout=3)
        log.close()


def _wait_for_jobs_api(address, env, head, log_path, limit=120):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert head.poll() is None, log_path.read_text()[-3000:]
        probe = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray head's job API never came up: {log_path.read_text()[-3000:]}")


#: What the head answers while its job agent has not registered yet (the jobs API itself is
#: up): Ray says to try again later, and so do we, for up to AGENT_WAIT_S.
NO_AGENT = "No available agent to submit job"
AGENT_WAIT_S = 120


def _submit(address, env, job, argv):
    """`ray job submit` of ``python argv`` from ``job``; (submission id, CompletedProcess). A
    submission refused only because the node's job agent is not up yet is tried again."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        sid = f"ntk-scale-test-{secrets.token_hex(4)}"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir",
               str(job), "--submission-id", sid, "--", sys.executable, *argv]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        if proc.returncode == 0 or NO_AGENT not in proc.stdout + proc.stderr:
            return sid, proc
        if time.monotonic() > deadline:
            return sid, proc
        time.sleep(3)


def test_ray_job_submit_fit(ray_head, tmp_path):
    address, env = ray_head
    job = tmp_path / "job"
    job.mkdir()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 5))
    np.save(job / "x.npy", x)
    np.save(job / "y.npy", np.sin(x[:, 0]))
    np.save(job / "xs.npy", rng.normal(size=(20, 5)))
    out = tmp_path / "out"
    (job / "cfg.toml").write_text(
        f"""
[data]
x_train = "x.npy"
y_train = "y.npy"
x_test = "xs.npy"

[kernel]
depth = 2

[store]
path = "file://{tmp_path}/gram.zarr"
tile = 64
dtype = "float64"

[solver]
tol = 1e-8
rank = 50

[run]
workers = 2
accelerator = "cpu"  # a job on a cluster asks for GPUs by default; this head has none

[output]
dir = "file://{out}"
"""
    )
    sid, submit = _submit(address, env, job, ["-m", "ntk_scale.cli", "fit", "cfg.toml"])
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", address, sid],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submit.returncode == 0 and status.returncode == 0
    assert f"Job '{sid}' succeeded" in status.stdout + status.stderr, (
        submit.stdout[-3000:] + submit.stderr[-3000:]
    )
    pred = np.load(out / "predictions.npy")
    assert pred.shape == (20,)
    # The config's kernel: depth 2, the rest FullyConnected's defaults (relu, W_std √2,
    # b_std 0, ntk); solver defaults: relative ridge 1e-4.
    x, y, xs = (np.load(job / f"{name}.npy") for name in ("x", "y", "xs"))
    ref = dense_predictions(FullyConnected(depth=2), x, y, xs, ridge=1e-4)
    err = relative_max_error(pred, ref)
    # float64 store, tol 1e-8: the error tracks tol (measured 8e-9; cond(K + λI) ≈ 3e3 bounds
    # it by 3e-5 at worst). 1e-6 leaves 100x margin and is far below a wrong answer: ridge 2x
    # or absolute instead of relative gives ~4e-4, depth 3 3e-2, nngp 0.16.
    assert err <= 1e-6, f"ray job predictions vs dense Cholesky: relative max error {err:.2e}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["solver"]["converged"] == [True]
    # Without the token the job API refuses the request.
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    denied = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", address],
        env=no_token,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert denied.returncode != 0
