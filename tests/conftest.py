"""Test-wide setup: CPU JAX, loopback Ray with its token in a private HOME, one Ray a session."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray writes ~/.ray/auth_token: keep the tests' tokens out of the real home directory.
_HOME = tempfile.mkdtemp(prefix="ntk-scale-test-home-")
os.environ["HOME"] = _HOME

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (ray.init takes ~8 s here), bound to 127.0.0.1."""
    from ntk_scale.cluster import ensure_ray

    ray = ensure_ray(None)
    yield ray
    ray.shutdown()
