# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it
# needs on first use (re-installing when pyproject.toml changes). `make test-fast` is the inner loop:
# no Ray, no subprocess, no S3 server (tests/conftest.py enforces it) and no test marked slow (an
# in-process test of more than a few seconds, or one of many alike), under 3 minutes on 2 cores.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PYTHONUNBUFFERED := 1

# make test runs its files on two pytest workers (pytest-xdist), a whole file on one worker so
# that a file's module fixtures and its session Ray are built once. Half the suite's time is
# waiting (Ray and subprocess start-up, resumes after kills), which the other worker fills.
# tests/conftest.py puts the slowest files first; --no-loadscope-reorder keeps that order
# (xdist would otherwise hand out files by their number of tests, so slow few-test files ran last).
TEST_WORKERS ?= 2

.PHONY: demo test test-fast lint bench clean

# uv (from PyPI, into the venv) installs the same packages as pip, several times faster: the
# install is a third of CI's time on 2 cores.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ntk_scale needs Python >= 3.11, found " + sys.version.split()[0]'
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install -q --python $(VENV)/bin/python -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ntk-scale demo

test: $(STAMP)
	$(VENV)/bin/ruff check ntk_scale tests benchmarks
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests

test-fast: $(STAMP)
	$(VENV)/bin/ruff check ntk_scale tests benchmarks
	NTK_SCALE_TEST_TIER=fast $(VENV)/bin/python -m pytest -q -m 'not cluster and not slow' \
	  -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check ntk_scale tests benchmarks
	$(VENV)/bin/ruff format --check ntk_scale tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
