# Quick start: `make demo` (set up + the main job) and `make test` (the whole suite; `make test-fast` while iterating).
# Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: venv install install-dev demo demo-quick test test-fast lint bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(VENV)/bin/python

install: venv
	$(PIP) install -q -e ".[engine,service]"

install-dev: venv
	$(PIP) install -q -e ".[engine,service,dev]"

demo: install
	$(VENV)/bin/sgtm demo

demo-quick: install
	$(VENV)/bin/sgtm demo --quick

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q

# The suite without tests marked slow (torchrun, CLI subprocesses, the attack matrix, API fuzzing) or integration.
test-fast: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q -m "not slow and not integration"

bench: install
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
