"""Connecting to Ray: a local instance on 127.0.0.1 (the embedded default) or a cluster."""

from __future__ import annotations

import os
from typing import Any


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Return the ``ray`` module, initialised.

    address: None starts a local Ray bound to 127.0.0.1 (unless ``RAY_ADDRESS`` is set or Ray is
    already initialised); "auto" or "ray://host:port" or "host:port" joins an existing cluster.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray's own switch for a local-only instance: it must be in the environment of the
        # process that starts Ray (this one) before Ray reads its configuration.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import warnings

    import ray

    # Ray starts its processes with fork+exec; after JAX has run in this process Python warns
    # that fork is unsafe with threads, which does not apply to an immediate exec.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=True)
        return ray
    # A new local instance gets Ray's token authentication by default (the token is written to
    # ~/.ray/auth_token), unless RAY_AUTH_MODE says otherwise.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=False,
    )
    return ray


def cluster_gpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def worker_env(use_gpu: bool, threads: int | None) -> dict[str, str]:
    """Environment for worker actors: CPU-only JAX where there is no GPU, bounded threads, no GPU
    memory preallocation (actors may share a GPU), and float32 tiles never in TF32."""
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    if not use_gpu:
        env["JAX_PLATFORMS"] = "cpu"
    if threads:
        env["XLA_FLAGS"] = (
            f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
        )
        env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = str(threads)
    return env


def gather(ray: Any, refs: list[Any], timeout_s: float, who: str, what: str, fix: str) -> list:
    """ray.get with a timeout, turning Ray's errors into ones that say what to change.

    who: the actors ("panel", "matrix-free"); what: the operation; fix: advice if an actor died.
    """
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"{who} actors took over {timeout_s:.0f} s {what}; check `ray status` for free "
            "CPUs/GPUs (each actor needs one) or raise timeout_s"
        ) from None
    except ray.exceptions.RayActorError as err:
        raise RuntimeError(
            f"a {who} actor died while {what} ({err}); it may have run out of memory: {fix}"
        ) from err
