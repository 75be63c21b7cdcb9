# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it
# needs on first use (re-installing when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PYTHONUNBUFFERED := 1

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ntk_scale needs Python >= 3.11, found " + sys.version.split()[0]'
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ntk-scale demo

test: $(STAMP)
	$(VENV)/bin/ruff check ntk_scale tests benchmarks
	$(VENV)/bin/python -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check ntk_scale tests benchmarks
	$(VENV)/bin/ruff format --check ntk_scale tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
