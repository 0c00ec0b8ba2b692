# nephrotrack — `make run` starts everything on the embedded default; `make test` runs all tests.
# Both create .venv and install the project on first use (and again when pyproject.toml changes).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast test-faults bench demo migrate rebuild lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

run: $(STAMP)  ## all five services + embedded NATS, SQLite under var/
	$(BIN)/nephrotrack run

demo: $(STAMP)  ## load the published cohort into a running stack and print the table
	$(BIN)/nephrotrack demo

migrate: $(STAMP)
	$(BIN)/nephrotrack migrate

rebuild: $(STAMP)
	$(BIN)/nephrotrack rebuild

test: $(STAMP)  ## every test, against the machine's PostgreSQL and NATS (see tests/conftest.py)
	$(BIN)/python -m tests.preflight
	$(BIN)/pytest -p no:cacheprovider

test-fast: $(STAMP)  ## pure domain tests only: no servers needed
	$(BIN)/pytest -p no:cacheprovider tests/unit

test-faults: $(STAMP)  ## the fault-injection suite (kills services, restarts the broker)
	$(BIN)/python -m tests.preflight
	$(BIN)/pytest -p no:cacheprovider tests/fault

bench: $(STAMP)  ## benchmarks; results appended to bench/RESULTS.md
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
