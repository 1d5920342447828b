# Two commands on a fresh machine:
#   make quickstart   set up .venv with the core only and run the whole spine on the bundled corpus
#   make test         set up .venv with every extra and the test tools, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# The versions the suite last passed with (scripts/constraints.py writes it): `make test` and CI
# install exactly these; the quickstart takes the newest that pyproject.toml's ranges allow.
CONSTRAINTS ?= constraints.txt

.PHONY: setup setup-core quickstart test lint bench clean

# The core: torch first (the build you want; pip keeps it), then lmforge without extras.
$(VENV)/.core-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	@touch $@

# The test set: the core, every extra (serve, eval, align, track, ray, sweep, datasets) and the tests' tools.
$(VENV)/.dev-installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	@touch $@

setup-core: $(VENV)/.core-installed

setup: $(VENV)/.dev-installed

quickstart: setup-core
	$(BIN)/lmforge quickstart

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check lmforge tests benchmarks scripts

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
