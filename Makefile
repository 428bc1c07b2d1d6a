# One set of commands everywhere; each target installs what it needs on a fresh Debian 12.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBIAN_PACKAGES := clamav-daemon clamav-freshclam clamdscan clamav-testfiles inotify-tools python3-venv \
  prometheus nodejs
APT_ENV := DEBIAN_FRONTEND=noninteractive
LOGQL := tests/logql/node_modules/.installed

.PHONY: install deps run test lint format bench clean

install: deps $(BIN)/.installed $(LOGQL)

# Debian packages: installed only when one is missing (apt-get update first on a fresh machine).
deps:
	@if ! dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1; then \
	  echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
	  apt-get update -qq && $(APT_ENV) apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES); \
	fi

# Grafana's LogQL grammar, to check the Loki rules in docs/alerting (Debian's nodejs has no npm).
$(LOGQL): tests/logql/package.json tests/logql/package-lock.json
	@command -v npm >/dev/null || $(APT_ENV) apt-get install -y -qq --no-install-recommends npm
	npm ci --prefix tests/logql --no-audit --no-fund --loglevel=error
	touch $@

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: install
	scripts/run-local.sh

test: install
	$(BIN)/pytest -q

# Throughput, latency, memory and idle CPU against clamd's own limit (several minutes).
bench: install
	$(BIN)/python bench/bench.py

lint: install
	$(BIN)/ruff check watcher tests
	$(BIN)/ruff format --check watcher tests
	$(BIN)/mypy --strict watcher

format: install
	$(BIN)/ruff format watcher tests
	$(BIN)/ruff check --fix watcher tests

clean:
	rm -rf $(VENV) var build *.egg-info
