"""Test-wide setup: CPU JAX, loopback Ray with its token in a private HOME, one Ray a session
(one per pytest worker: make test runs two, pytest-xdist with --dist loadfile).

Two tiers. ``make test`` runs everything. ``make test-fast`` (the inner loop) runs the tests
that need no Ray, no subprocess and no S3 server: a test is in the full tier only when it uses a
fixture that starts one of those (``ray_local``, a ``ray start`` head, the moto server) or is
marked ``cluster``. The fast tier enforces its promise: with NTK_SCALE_TEST_TIER=fast, starting
Ray or a subprocess fails the test with a message saying how to mark it.
"""

import os
import subprocess
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray writes ~/.ray/auth_token: keep the tests' tokens out of the real home directory.
_HOME = tempfile.mkdtemp(prefix="ntk-scale-test-home-")
os.environ["HOME"] = _HOME
# One JAX compilation cache for the session, in its private HOME (fresh each run, so no test
# depends on an earlier run's state): the Ray workers (started from this environment), their
# replacements after the fault tests' kills and the subprocess drivers compile the same tile
# functions again and again. A size limit turns on the cache's file lock, so that a process
# never reads an entry another is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_HOME, "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pytest  # noqa: E402

#: Fixtures that start Ray, a subprocess or an S3 server: a test using one (directly or through
#: another fixture) is in the full tier only.
CLUSTER_FIXTURES = {"ray_local", "ray_head", "cpu_head", "s3", "pipeline"}
FAST = os.environ.get("NTK_SCALE_TEST_TIER") == "fast"


#: The slowest files, slowest first (seconds of a serial run on 2 cores, 2026-12-03). Under
#: pytest-xdist (--dist loadfile) they are handed out first, so that no long file starts last
#: while the other worker idles: longest-first scheduling. Order only; no test depends on it.
SLOW_FILES = (
    "test_pool",
    "test_sklearn_checks",
    "test_stax_oracle",
    "test_faults",
    "test_gram_processes",
    "test_lazy_inputs",
    "test_ray_job",
    "test_nystrom_stages",
    "test_gpu_wait",
    "test_s3",
    "test_stax_properties",
    "test_kernels_oracle",
    "test_stax_pipeline",
    "test_float32_conv",
    "test_stax_cli",
    "test_cli",
)


def _file_rank(item):
    name = item.path.stem
    return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
    if hasattr(config, "workerinput"):  # an xdist worker: every worker sorts the same way
        items.sort(key=_file_rank)  # stable: a file's own order is kept


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (ray.init takes ~8 s here), bound to 127.0.0.1."""
    from ntk_scale.cluster import ensure_ray

    ray = ensure_ray(None)
    yield ray
    ray.shutdown()


def _refuse(what):
    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"make test-fast runs no {what}: mark this test @pytest.mark.cluster or give it the "
            "ray_local fixture, so that it runs in make test only"
        )

    return refuse


@pytest.fixture(autouse=True)
def _fast_tier_guard(request, monkeypatch):
    """In the fast tier a test that starts Ray or a subprocess fails, saying how to mark it."""
    if FAST and request.node.get_closest_marker("cluster") is None:
        import ray

        monkeypatch.setattr(ray, "init", _refuse("Ray"))
        monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("subprocess"))
    yield
