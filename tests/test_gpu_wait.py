"""GPUs where promised: a run asked to use GPUs (on a cluster, by default) waits a bounded time
for them, then fails with GPUUnavailableError (CLI exit 3) unless allow_cpu; nothing falls back
to CPUs silently. The decision with a fake cluster; hosts of one GPU model on fake Ray GPUs; a
real `ray start` head without GPUs joined by address."""

from __future__ import annotations

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
from fake_ray import FakeRay
from processes import SCRIPTS, stop_group

from ntk_scale import NTKRegressor
from ntk_scale.cluster import joins_cluster, wait_for_gpus
from ntk_scale.errors import GPUUnavailableError
from ntk_scale.options import RunOptions
from ntk_scale.pool import HostRequest, host_request

BIN = Path(sys.executable).parent




CPU_ONLY = FakeRay({"CPU": 8})
A10G = FakeRay({"CPU": 8}, {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1})


def test_local_ray_keeps_cpu_default_and_cluster_requires_gpus():
    run = RunOptions(gpu_wait_s=0.2, wait_seconds=0.05)
    assert host_request(CPU_ONLY, run, on_cluster=False) == HostRequest(False, 1)
    assert host_request(A10G, run, on_cluster=False) == HostRequest(True, 1)
    assert host_request(A10G, run, on_cluster=True) == HostRequest(True, 1)
    start = time.monotonic()
    with pytest.raises(GPUUnavailableError) as err:
        host_request(CPU_ONLY, run, on_cluster=True)
    assert time.monotonic() - start >= 0.2  # the bounded wait
    text = str(err.value)
    assert "within 0.2 s" in text and "--allow-cpu" in text and "GPU worker group" in text
    assert "0 GPUs, 8 CPUs" in text
    cpu = RunOptions(accelerator="cpu", threads_per_worker=2)
    assert host_request(A10G, cpu, on_cluster=True) == HostRequest(False, 2)


def test_allow_cpu_warns_and_falls_back():
    run = RunOptions(gpu_wait_s=0.1, wait_seconds=0.05, allow_cpu=True)
    with pytest.warns(RuntimeWarning, match=r"no GPU joined .* going on with CPU workers"):
        assert host_request(CPU_ONLY, run, on_cluster=True) == HostRequest(False, 1)


def test_gpu_model_maps_to_ray_accelerator_type():
    a100 = RunOptions(accelerator="A100", gpu_wait_s=0)
    with pytest.raises(GPUUnavailableError, match=r"no A100 GPU joined .* 1 A100 GPU each"):
        host_request(A10G, a100, on_cluster=True)  # GPUs, but not of that model
    # a local Ray adds no nodes: an explicit GPU ask fails at once, without waiting
    with pytest.raises(GPUUnavailableError, match="local Ray"):
        host_request(CPU_ONLY, RunOptions(accelerator="gpu", gpu_wait_s=60), on_cluster=False)
    got = host_request(A10G, RunOptions(accelerator="A10G"), on_cluster=True)
    assert got == HostRequest(True, 1, "A10G")
    assert got.resources == {"num_gpus": 1, "accelerator_type": "A10G"}


def test_wait_returns_once_gpus_join():
    ray = FakeRay({"CPU": 8})
    now = [0.0]

    def sleep(s):
        now[0] += s
        if now[0] >= 3:  # the autoscaler's GPU node joins after 3 s
            ray.node_list = [{"CPU": 8}, {"GPU": 2, "accelerator_type:L4": 1}]

    have = wait_for_gpus(ray, 2, "L4", 60, poll_s=1, clock=lambda: now[0], sleep=sleep)
    assert have == 2 and now[0] == 3
    assert wait_for_gpus(FakeRay({"CPU": 1}), 1, None, 5, 1, lambda: now[0], sleep) == 0


def test_options_config_estimator_and_address():
    for bad in ({"accelerator": "a100 gpu"}, {"accelerator": ""}, {"gpu_wait_s": -1},
                {"allow_cpu": "yes"}):  # fmt: skip
        with pytest.raises(ValueError):
            RunOptions(**bad)
    est = NTKRegressor(allow_cpu=True, accelerator="L4")
    assert est.get_params()["allow_cpu"] is True and est._options()[2].accelerator == "L4"
    assert joins_cluster("10.0.0.1:6379") and not joins_cluster("local")


def test_config_keys(tmp_path):
    from ntk_scale.config import load_config

    (tmp_path / "c.toml").write_text(
        '[data]\nx_train = "x.npy"\ny_train = "y.npy"\n[store]\npath = "g.zarr"\n'
        '[run]\naccelerator = "H100"\nallow_cpu = true\ngpu_wait_s = 30\n[output]\ndir = "o"\n'
    )
    run = load_config(str(tmp_path / "c.toml")).run
    assert (run.accelerator, run.allow_cpu, run.gpu_wait_s) == ("H100", True, 30)


@pytest.mark.cluster  # starts a subprocess or Ray itself
def test_hosts_of_one_gpu_model_on_fake_gpus():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_models.py")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["hosts"] == ["0", "1"]
    assert report["request"] == {"num_gpus": 1, "accelerator_type": "A100"}
    assert "no H100 GPU joined this local Ray" in report["error"] and report["error_s"] < 10


# -- a real head without GPUs, joined by address --------------------------------------------
def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def cpu_head(tmp_path_factory):
    """`ray start --head --block` (2 CPUs, no GPU) in its own process group, token auth with
    its token in a private HOME; ended by killing the group."""
    tmp = tmp_path_factory.mktemp("head")
    gcs, client, http, grpc, metrics, env_agent, nm, om = _free_ports(8)
    env = {**os.environ, "HOME": str(tmp / "home"), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="gw", dir="/tmp")  # unix socket paths must stay short
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={http}", f"--dashboard-agent-grpc-port={grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", "--num-cpus=2",
           "--num-gpus=0", f"--temp-dir={temp_dir}", "--include-dashboard=false"]  # fmt: skip
    log = open(tmp / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        # `ray start` prints this once the GCS and the raylet are up: a driver that connects
        # when the GCS only listens can fail ("Failed to connect to Ray cluster") under load.
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (tmp / "head.log").read_text():
            assert head.poll() is None, (tmp / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head never started"
            time.sleep(0.5)
        yield f"127.0.0.1:{gcs}", env, tmp
    finally:
        stop_group(head, timeout=5)
        log.close()


def _gram(address, env, tmp, *flags):
    store = str(tmp / f"g{len(flags)}.zarr")
    args = ["gram", "--x", str(tmp / "x.npy"), "--store", store, "--tile", "32",
            "--depth", "2", "--no-progress", "--address", address, *flags]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ntk_scale.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    return proc, time.monotonic() - start


def test_cluster_without_gpus_waits_then_exits_3_and_allow_cpu_proceeds(cpu_head):
    address, env, tmp = cpu_head
    np.save(tmp / "x.npy", np.random.default_rng(0).normal(size=(64, 4)))
    proc, took = _gram(address, env, tmp, "--gpu-wait", "3")
    assert proc.returncode == 3, (proc.stdout + proc.stderr)[-3000:]
    assert "no GPU joined the Ray cluster within 3 s" in proc.stderr
    assert "--allow-cpu" in proc.stderr and "GPU worker group" in proc.stderr
    assert took >= 3
    proc, _ = _gram(address, env, tmp, "--gpu-wait", "1", "--allow-cpu")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "going on with CPU workers" in proc.stderr and "computed" in proc.stdout
