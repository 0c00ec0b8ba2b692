# nephrotrack — `make run` starts everything on the embedded default; `make test` runs all tests.
# Both create .venv and install the project on first use (and again when pyproject.toml changes).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast test-faults test-fuzz bench demo migrate rebuild lint clean browsers promtool haproxy cluster cluster-local

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	@touch $@

run: $(STAMP)  ## all five services + embedded NATS, SQLite under var/
	$(BIN)/nephrotrack run

demo: $(STAMP)  ## load the published cohort into a running stack and print the table
	$(BIN)/nephrotrack demo

cluster:  ## 3 NATS nodes, R3 streams, 2 replicas of each service, with Docker Compose (deploy/README.md)
	deploy/cluster.sh

cluster-local: $(STAMP)  ## the same without Docker: local processes, SQLite under var/, Ctrl-C stops (deploy/README.md)
	$(BIN)/nephrotrack cluster

migrate: $(STAMP)
	$(BIN)/nephrotrack migrate

rebuild: $(STAMP)
	$(BIN)/nephrotrack rebuild

test: $(STAMP) browsers promtool haproxy  ## every test, against the machine's PostgreSQL and NATS (see tests/conftest.py)
	$(BIN)/python -m tests.preflight
	$(BIN)/pytest -p no:cacheprovider

# $(call debian_tool,NAME,PRESENT,VERSION,PACKAGE,SKIPPED): a test tool from Debian. Reports it
# when the shell test PRESENT holds; else installs PACKAGE when root with apt; else warns loudly
# that SKIPPED will be skipped (the tests themselves skip saying why).
debian_tool = @if $(2); then \
		echo "$(1): $$($(3))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "$(1): installing Debian's $(4) package for $(5)"; \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(4) \
		  || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(4); }; } \
		|| echo "!!!!! WARNING: apt-get could not install $(4): $(5) will be SKIPPED !!!!!" >&2; \
	else \
		echo "!!!!! WARNING: no $(1), and not root with apt-get to install it (apt-get install $(4)):" >&2; \
		echo "!!!!! $(5) will be SKIPPED !!!!!" >&2; \
	fi

# The dashboard's browser tests drive Debian's Chromium through Playwright (pip package, in the dev
# extras; `playwright install` is never needed).
CHROMIUM ?= /usr/bin/chromium

browsers:  ## Chromium for the dashboard browser tests (Debian package, root + apt only)
	$(call debian_tool,chromium,[ -x "$(CHROMIUM)" ],$(CHROMIUM) --version 2>/dev/null || echo "$(CHROMIUM)",chromium,the dashboard browser tests)

# promtool checks deploy/prometheus (config, alert rules and their unit tests).
promtool:  ## promtool for the Prometheus rule tests (Debian package, root + apt only)
	$(call debian_tool,promtool,command -v promtool >/dev/null 2>&1,promtool --version 2>&1 | head -1,prometheus,the promtool checks)

# haproxy -c checks the compose front door's configuration (deploy/haproxy/haproxy.cfg).
haproxy:  ## HAProxy for the front door's configuration check (Debian package, root + apt only)
	$(call debian_tool,haproxy,command -v haproxy >/dev/null 2>&1,haproxy -v 2>&1 | head -1,haproxy,the front door configuration check)

lint: $(STAMP)  ## ruff (rules and exceptions in pyproject.toml)
	$(BIN)/ruff check .

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
