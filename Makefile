# order-viewer: `make run` runs the service with everything it needs, `make test` runs the tests.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# Test workers, each with its own PostgreSQL and Kafka; tests sharing a service stay together.
PARALLEL := -n 3 --dist loadgroup
PYTHON ?= python3

.PHONY: install lock run stack stack-down test test-unit test-integration test-faults check bench clean

install: $(VENV)/.installed

# The exact versions of requirements/dev.txt, each checked against its hash; `make lock` renews it.
$(VENV)/.installed: pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps --editable .
	touch $@

## Pin every dependency (and its hashes) after a change of pyproject.toml's dependencies.
lock: install
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
		--quiet -o requirements/main.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--generate-hashes --quiet -o requirements/dev.txt

## Start the local servers (when the settings point at them), migrate, send demo orders, serve.
run: install
	scripts/run.sh

## The local PostgreSQL and Kafka servers only.
stack:
	scripts/stack.sh up

stack-down:
	scripts/stack.sh down

## Every test, unit and integration, against real servers the suite starts for itself.
test: install
	scripts/stack.sh install
	scripts/stack.sh install-browser
	scripts/stack.sh install-compose
	$(BIN)/python -m devstack.deploy_tools
	$(BIN)/pytest $(PARALLEL)

test-unit: install
	$(BIN)/pytest tests/unit

## The fault-injection scenarios alone (they are part of `make test` too).
test-faults: install
	scripts/stack.sh install
	$(BIN)/pytest -m faults

test-integration: install
	scripts/stack.sh install
	$(BIN)/pytest tests/integration tests/e2e

check: install
	$(BIN)/ruff check src tests benchmarks devstack deploy
	$(BIN)/ruff format --check src tests benchmarks devstack deploy
	$(BIN)/mypy

bench: install
	scripts/stack.sh up
	scripts/stack.sh install-bench-tools
	$(BIN)/python -m benchmarks
	$(BIN)/pytest -m perf -s

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
