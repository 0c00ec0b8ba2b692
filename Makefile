# nephrotrack — `make run` starts everything on the embedded default; `make test` runs all tests.
# Both create .venv and install the project on first use (and again when pyproject.toml changes).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast test-faults test-fuzz bench demo migrate rebuild lint clean browsers promtool

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

test: $(STAMP) browsers promtool  ## every test, against the machine's PostgreSQL and NATS (see tests/conftest.py)
	$(BIN)/python -m tests.preflight
	$(BIN)/pytest -p no:cacheprovider

# The dashboard's browser tests drive Debian's Chromium through Playwright (pip package, in the dev
# extras; `playwright install` is never needed). Installed here when missing, as root with apt;
# otherwise a loud warning, and tests/dashboard skips its browser test saying why.
CHROMIUM ?= /usr/bin/chromium

browsers:  ## Chromium for the dashboard browser tests (Debian package, root + apt only)
	@if [ -x "$(CHROMIUM)" ]; then \
		echo "browsers: $$($(CHROMIUM) --version 2>/dev/null || echo "$(CHROMIUM)")"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "browsers: installing Debian's chromium for the dashboard browser tests"; \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium \
		  || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }; } \
		|| echo "!!!!! WARNING: apt-get could not install chromium: the dashboard browser tests will be SKIPPED !!!!!" >&2; \
	else \
		echo "!!!!! WARNING: no $(CHROMIUM), and not root with apt-get to install it (apt-get install chromium):" >&2; \
		echo "!!!!! the dashboard browser tests will be SKIPPED !!!!!" >&2; \
	fi

# promtool checks deploy/prometheus (config, alert rules and their unit tests): Debian's
# `prometheus` package, installed like Chromium above; otherwise tests/deploy skips those checks loudly.
promtool:  ## promtool for the Prometheus rule tests (Debian package, root + apt only)
	@if command -v promtool >/dev/null 2>&1; then \
		echo "promtool: $$(promtool --version 2>&1 | head -1)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "promtool: installing Debian's prometheus package for the rule tests"; \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
		  || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; }; } \
		|| echo "!!!!! WARNING: apt-get could not install prometheus: the promtool checks will be SKIPPED !!!!!" >&2; \
	else \
		echo "!!!!! WARNING: no promtool, and not root with apt-get to install it: the promtool checks will be SKIPPED !!!!!" >&2; \
	fi

test-fast: $(STAMP)  ## pure domain tests only: no servers needed
	$(BIN)/pytest -p no:cacheprovider tests/unit

# The long fault scenarios (thousands of inputs each; about 15 min on two cores) and the full fuzz
# budgets (tens of thousands of cases; about 30 min). `make test` runs the short versions.
test-faults: $(STAMP)  ## the fault-injection suite (kills services, restarts the broker, cuts the database)
	$(BIN)/python -m tests.preflight
	NEPHROTRACK_FAULTS=full $(BIN)/pytest -p no:cacheprovider -s -o timeout=1800 tests/fault

test-fuzz: $(STAMP)  ## every entry point fuzzed with the full budget (docs/robustness.md)
	$(BIN)/python -m tests.preflight
	NEPHROTRACK_FUZZ=full $(BIN)/pytest -p no:cacheprovider -s -o timeout=7200 tests/fuzz

bench: $(STAMP)  ## benchmarks; results appended to bench/RESULTS.md
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
