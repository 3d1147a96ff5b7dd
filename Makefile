# order-viewer: `make run` runs the service with everything it needs, `make test` runs the tests.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# Test workers, each with its own PostgreSQL and Kafka; tests sharing a service stay together.
PARALLEL := -n 3 --dist loadgroup
PYTHON ?= python3
DEVSTACK := $(BIN)/python -m devstack

.PHONY: install venv lock run stack stack-down test test-unit test-integration test-faults check bench soak clean

## The virtualenv, then the system's part the service needs (PostgreSQL, Java, the Kafka jars),
## installed where missing: with `test`'s extras, the one step that installs anything.
install: venv
	$(DEVSTACK) install

venv: $(VENV)/.installed

# The exact versions of requirements/dev.txt, each checked against its hash; `make lock` renews it.
$(VENV)/.installed: pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps --editable .
	touch $@

## Pin every dependency (and its hashes) after a change of pyproject.toml's dependencies.
lock: venv
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
		--quiet -o requirements/main.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--generate-hashes --quiet -o requirements/dev.txt

## Start the local servers (when the settings point at them), migrate, send demo orders, serve.
run: install
	$(DEVSTACK) run

## The local PostgreSQL and Kafka servers only.
stack: install
	$(DEVSTACK) up

stack-down: venv
	$(DEVSTACK) down

## Every test, unit and integration, against real servers the suite starts for itself.
test: venv
	$(DEVSTACK) install --browser --compose --deploy-tools
	$(BIN)/pytest $(PARALLEL)

test-unit: venv
	$(BIN)/pytest tests/unit

## The fault-injection scenarios alone (they are part of `make test` too), spread over the same
## workers as `make test`: each scenario mostly waits out an outage or a deadline.
test-faults: install
	$(BIN)/pytest -m faults $(PARALLEL)

test-integration: install
	$(BIN)/pytest tests/integration tests/e2e

check: venv
	$(BIN)/ruff check src tests benchmarks devstack deploy
	$(BIN)/ruff format --check src tests benchmarks devstack deploy
	$(BIN)/mypy
	$(BIN)/shellcheck .ci/run

bench: venv
	$(DEVSTACK) install --bench-tools
	$(DEVSTACK) up
	$(BIN)/python -m benchmarks
	$(BIN)/pytest -m perf -s

## The chaos soak of docs/RELIABILITY.md, on servers of its own: faults for 20 minutes, then an
## audit; e.g. `make soak SOAK_ARGS="--minutes 3 --seed 9"`.
soak: install
	$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
