"""Test-wide setup: CPU JAX, a private HOME for Ray's token, one Ray for the session."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
