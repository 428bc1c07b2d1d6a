# One set of commands everywhere; each target installs what it needs on a fresh Debian 12.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBIAN_PACKAGES := clamav-daemon clamav-freshclam clamdscan clamav-testfiles inotify-tools python3-venv
# The archive tests build their cases with the real tools (tests/archive_cases.py); the
# PostgreSQL verdict store's tests run a real server (tests/harness/postgres.py).
TEST_DEBIAN_PACKAGES := zip p7zip-full postgresql-15
APT_ENV := DEBIAN_FRONTEND=noninteractive
LOGQL := tests/logql/node_modules/.installed

.PHONY: install deps test-deps run test lint format bench clean docs

install: deps $(BIN)/.installed

# Debian packages: installed only when one is missing (apt-get update first on a fresh machine).
deps:
	@if ! dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1; then \
	  echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
	  apt-get update -qq && $(APT_ENV) apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES); \
	fi

# Only the tests need these: zip and 7z build the archive cases; promtool (in Debian's
# prometheus) checks the alert rules; node runs the Node.js example and Grafana's LogQL grammar;
# kubectl (Debian's kubernetes-client) renders the Kubernetes manifests with its kustomize.
# Each is installed only if missing. Debian's prometheus starts a server on :9090 where systemd runs: we want promtool only;
# the same for postgresql-15's cluster on :5432 (the tests start their own, as the postgres user).
test-deps: $(LOGQL)
	@if ! dpkg -s $(TEST_DEBIAN_PACKAGES) >/dev/null 2>&1; then \
	  apt-get update -qq && $(APT_ENV) apt-get install -y -qq --no-install-recommends $(TEST_DEBIAN_PACKAGES) && \
	  { [ ! -d /run/systemd/system ] || systemctl disable --now postgresql >/dev/null 2>&1 || true; }; \
	fi
	@command -v kubectl >/dev/null || { \
	  apt-get update -qq && $(APT_ENV) apt-get install -y -qq --no-install-recommends kubernetes-client; }
	@command -v promtool >/dev/null || { \
	  apt-get update -qq && $(APT_ENV) apt-get install -y -qq --no-install-recommends prometheus && \
	  { [ ! -d /run/systemd/system ] || systemctl disable --now prometheus >/dev/null 2>&1 || true; }; }

# Grafana's LogQL grammar, to check the Loki rules in docs/alerting.
$(LOGQL): tests/logql/package.json tests/logql/package-lock.json
	@command -v npm >/dev/null || { apt-get update -qq && $(APT_ENV) apt-get install -y -qq --no-install-recommends nodejs npm; }
	npm ci --prefix tests/logql --no-audit --no-fund --loglevel=error
	touch $@

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: install
	scripts/run-local.sh

# --require-clamd: a missing clamd fails the run; it never skips the tests that need one.
test: install test-deps
	$(BIN)/pytest -q --require-clamd

# Replicas on hosts simulated with network and mount namespaces (root; about 1.5 minutes; not part
# of `make test`): exactly-once through a host's death and a clamd outage, leases where locks
# are kernel-local (bindfs, as NFS `nolock`). tests/test_hosts.py, tests/harness/hosts.py.
.PHONY: replicas-test
replicas-test: install hosts-deps
	$(BIN)/pytest -q --require-clamd --hosts tests/test_hosts.py

# Files/s with 1, 2, 3 replicas (each its own host and clamd) and 1, 2, 3 clamd endpoints,
# alternating rounds, medians and CPU per file (several minutes). docs/scaling.md.
.PHONY: bench-replicas
bench-replicas: install hosts-deps
	cd bench && $(abspath $(BIN))/python replicas_bench.py $(REPLICAS_BENCH_ARGS)

# unshare/nsenter (util-linux), ip (iproute2), bindfs (a FUSE view whose locks stay its own).
.PHONY: hosts-deps
hosts-deps:
	@if ! dpkg -s iproute2 bindfs fuse3 util-linux >/dev/null 2>&1; then \
	  apt-get update -qq && $(APT_ENV) apt-get install -y -qq --no-install-recommends iproute2 bindfs fuse3 util-linux; \
	fi

# Throughput, latency, memory and idle CPU against clamd's own limit (several minutes).
bench: install
	$(BIN)/python bench/bench.py

# The HTTP API: requests/s and the delivery rate while it is abused, A/B against an earlier
# revision (several minutes). E.g. make bench-http HTTP_BENCH_ARGS="--compare main --rounds 5".
.PHONY: bench-http
bench-http: install
	$(BIN)/python bench/http_bench.py $(HTTP_BENCH_ARGS)

# Daemon CPU per file, this checkout against another revision, alternating on one clamd
# (several minutes). E.g. make bench-ab AB_ARGS="--compare main --rounds 6" (or --together).
.PHONY: bench-ab
bench-ab: install
	$(BIN)/python bench/code_ab.py $(AB_ARGS)

# Fault injection under load, then proof that nothing was lost (root; about 6 minutes; not part
# of `make test`). docs/soak.md; bench/soak/. E.g. make soak SOAK_ARGS="--seed 42 --minutes 10".
.PHONY: soak
soak: install
	cd bench && $(abspath $(BIN))/python -m soak $(SOAK_ARGS)

lint: install
	$(BIN)/ruff check watcher tests bench
	$(BIN)/ruff format --check watcher tests bench
	$(BIN)/mypy --strict watcher tests bench

# Generated documentation: docs/events.md's table from the event catalog (watcher/events.py).
# tests/test_docs.py fails when it is out of date.
docs: install
	{ sed '/^<!-- generated by `make docs`/q' docs/events.md; $(BIN)/python -m watcher.events; } > docs/events.md.tmp
	mv docs/events.md.tmp docs/events.md

format: install
	$(BIN)/ruff format watcher tests bench
	$(BIN)/ruff check --fix watcher tests bench

clean:
	rm -rf $(VENV) var build *.egg-info

include docker/image.mk
