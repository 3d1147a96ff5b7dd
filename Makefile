# order-viewer: `make run` runs the service with everything it needs, `make test` runs the tests.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3
DEVSTACK := $(BIN)/python -m devstack

.PHONY: install venv run stack stack-down test test-unit test-integration test-faults check bench clean

## The virtualenv, then the system's part (PostgreSQL, Java, the Kafka jars, chromium,
## docker-compose) installed where missing: the one step that installs anything.
install: venv
	$(DEVSTACK) install --browser --compose

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[dev]'
	touch $@

## Start the local servers (when the settings point at them), migrate, send demo orders, serve.
run: install
	$(DEVSTACK) run

## The local PostgreSQL and Kafka servers only.
stack: install
	$(DEVSTACK) up

stack-down: venv
	$(DEVSTACK) down

## Every test, unit and integration, against real servers the suite starts for itself.
test: install
	$(BIN)/pytest

test-unit: venv
	$(BIN)/pytest tests/unit

## The fault-injection scenarios alone (they are part of `make test` too).
test-faults: install
	$(BIN)/pytest -m faults

test-integration: install
	$(BIN)/pytest tests/integration tests/e2e

check: venv
	$(BIN)/ruff check src tests benchmarks devstack
	$(BIN)/ruff format --check src tests benchmarks devstack
	$(BIN)/mypy

bench: install
	$(DEVSTACK) install --bench-tools
	$(DEVSTACK) up
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
