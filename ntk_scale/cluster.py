"""Connecting to Ray: a local instance on 127.0.0.1 (the embedded default) or a cluster; what
GPUs it has, and a bounded wait for GPUs the autoscaler may still be adding."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

#: Seconds this process took to start or join Ray: "ray" by :func:`ensure_ray`, "launch" when
#: :mod:`ntk_scale.launch` did it beside the CLI's imports (absent: not yet).
STARTED_S: dict[str, float] = {}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Return the ``ray`` module, initialised (the seconds it took in ``STARTED_S["ray"]``).

    address: None starts a local Ray bound to 127.0.0.1 (unless ``RAY_ADDRESS`` is set or Ray is
    already initialised); "auto" or "ray://host:port" or "host:port" joins an existing cluster.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray's own switch for a local-only instance: it must be in the environment of the
        # process that starts Ray (this one) before Ray reads its configuration.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return ray
    start = time.perf_counter()
    _init(ray, address, num_cpus)
    STARTED_S["ray"] = time.perf_counter() - start
    return ray


def _init(ray: Any, address: str | None, num_cpus: int | None) -> None:
    import warnings

    # Ray starts its processes with fork+exec; after JAX has run in this process Python warns
    # that fork is unsafe with threads, which does not apply to an immediate exec.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    if address:
        ray.init(address=address, log_to_driver=True)
        return
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


def joins_cluster(address: str | None = None) -> bool:
    """Whether ``address`` (else RAY_ADDRESS) names a cluster to join rather than a local Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    return bool(address) and address != "local"


def cluster_gpus(ray: Any, accelerator_type: str | None = None) -> int:
    """GPUs of the live nodes (only nodes of that GPU model with ``accelerator_type``)."""
    if accelerator_type is None:
        return int(ray.cluster_resources().get("GPU", 0))
    key = accelerator_resource(accelerator_type)
    nodes = [n for n in ray.nodes() if n.get("Alive") and key in n.get("Resources", {})]
    return int(sum(n["Resources"].get("GPU", 0) for n in nodes))


def cluster_accelerator(ray: Any) -> str | None:
    """The GPU model of the live GPU nodes (Ray's ``accelerator_type:<model>`` resource; the
    most GPUs wins), or None when no node names one."""
    gpus: dict[str, float] = {}
    for node in ray.nodes():
        res = node.get("Resources", {}) if node.get("Alive") else {}
        for key in res:
            if key.startswith("accelerator_type:") and res.get("GPU", 0) > 0:
                model = key.removeprefix("accelerator_type:")
                gpus[model] = gpus.get(model, 0) + res["GPU"]
    return max(gpus, key=gpus.__getitem__) if gpus else None


def accelerator_resource(accelerator_type: str) -> str:
    """Ray's resource for a GPU model: a node with A10G GPUs has ``accelerator_type:A10G``."""
    return f"accelerator_type:{accelerator_type}"


def gpu_bundle(accelerator_type: str | None) -> dict[str, float]:
    """What one GPU actor asks of the autoscaler (Ray asks 0.001 of the model's resource)."""
    bundle = {"GPU": 1.0}
    if accelerator_type is not None:
        bundle[accelerator_resource(accelerator_type)] = 0.001
    return bundle


def wait_for_gpus(
    ray: Any,
    want: int,
    accelerator_type: str | None,
    timeout_s: float,
    poll_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """GPUs present once ``want`` have joined or ``timeout_s`` has passed (0: look once).

    While waiting, the autoscaler is asked for ``want`` one-GPU bundles
    (``ray.autoscaler.sdk.request_resources``); the request is withdrawn on the way out, so it
    never keeps nodes alive after this run's actors have taken (or given up on) them.
    """
    have = cluster_gpus(ray, accelerator_type)
    if have >= want or timeout_s <= 0:
        return have
    deadline = clock() + timeout_s
    asked = _request_gpus([gpu_bundle(accelerator_type)] * want)
    try:
        while have < want and clock() < deadline:
            sleep(max(0.0, min(poll_s, deadline - clock())))
            have = cluster_gpus(ray, accelerator_type)
    finally:
        if asked:
            _request_gpus([])
    return have


def _request_gpus(bundles: list[dict[str, float]]) -> bool:
    """Ask the autoscaler for ``bundles`` ([] withdraws the request). A cluster without an
    autoscaler has nobody to ask: False, and the wait just watches the nodes."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=bundles)
    except Exception:  # noqa: BLE001 - a hint to the autoscaler, never a reason to fail
        return False
    return True
