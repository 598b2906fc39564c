# Set-up on a fresh machine is just `make demo` or `make test`: each creates .venv if missing,
# installs the project into it and runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

# Flower must never install runtime dependencies itself (it would fetch GBs of CUDA wheels).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export TIMM_FUSED_ATTN := 0
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core node a spinning thread holds
# the core its partner needs, and a training step takes 10x as long (measured).
export OMP_WAIT_POLICY := PASSIVE
# Tools started by Flower (flower-superlink, flower-supernode) come from the venv.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test e2e reliability lint bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.installed-lint: pyproject.toml $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet -e ".[test,lint]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/fedcmr-sim demo --out $(DEMO_OUT)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The deployment on loopback: SuperLink, SuperNodes and `flwr run` as real processes (~2.5 min).
e2e: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m e2e $(PYTEST_ARGS)

# The reliability and security checks (tests/reliability.py): the marked tests and one table,
# also in reliability.json.
reliability: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m reliability --reliability --reliability-json=reliability.json $(PYTEST_ARGS)

# ruff (packages, benchmarks, tests) and mypy (packages, benchmarks) as configured in pyproject.toml.
lint: $(VENV)/.installed-lint
	$(BIN)/ruff check .
	$(BIN)/mypy

# Every CPU benchmark in benchmarks/ (about 40 min on 2 cores): bench-results.json and a table.
bench: $(VENV)/.installed
	$(BIN)/python benchmarks/run_all.py --out bench-results.json

clean:
	rm -rf runs .pytest_cache
