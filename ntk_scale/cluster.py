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
