# DiReDi-secure. Two commands do all set-up on a fresh machine:
#   make demo   -- create .venv, install, run the main job
#   make test   -- same set-up, then the whole suite (what CI runs)
# Everything is installed from requirements.lock (hash-pinned; see LOCK below). Without the lock
# (make LOCK=) the torch pin is installed first and alone: an unpinned torch (or one pulled in by
# opacus) would download a multi-GB CUDA build. Override with e.g. `make LOCK= TORCH=torch==2.14.1 test`.

PYTHON ?= python3
TORCH ?= torch==2.13.0
# Where the torch wheel comes from. Empty: pip's configured index (as on the project's CI machines,
# whose index serves the CPU wheel). On a stock machine without a GPU, use PyTorch's CPU index,
# or pip resolves the multi-GB CUDA build:  make TORCH_INDEX=https://download.pytorch.org/whl/cpu test
TORCH_INDEX ?=
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The PostgreSQL backend's tests run against this server; scripts/ensure_postgres.sh starts one.
export DIREDI_TEST_POSTGRES_DSN ?= postgresql://postgres@127.0.0.1:5432/test

.PHONY: all venv demo test test-fast test-slow lint typecheck protos protos-check proto-check proto-baseline node-deps bench bench-quick fuzz clean

all: test

# The install set comes from the hash-pinned lock (every package, torch's CPU wheel included):
# what CI tested, byte for byte (a package whose hash differs stops the install). The lock is for
# CPython 3.11 on x86-64 Linux: on another Python or platform, or with TORCH_INDEX set, or with
# `make LOCK= venv`, the set is resolved from pyproject.toml with the torch pin installed first.
LOCK ?= requirements.lock
LOCK_PLATFORM := import platform, sys; sys.exit(sys.version_info[:2] != (3, 11) or sys.platform != 'linux' or platform.machine() != 'x86_64')

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if [ -n "$(strip $(LOCK))" ] && [ -z "$(TORCH_INDEX)" ] && $(BIN)/python -c "$(LOCK_PLATFORM)"; then \
		echo "installing the locked set ($(LOCK), --require-hashes)"; \
		$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK) && \
		$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . && \
		$(BIN)/python -m pip check; \
	else \
		echo "not using $(or $(strip $(LOCK)),a lock) (LOCK empty, TORCH_INDEX set, or not CPython 3.11 on x86-64 Linux): resolving from pyproject.toml, $(TORCH) first"; \
		$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)" && \
		$(BIN)/python -m pip install --quiet -e ".[dev,ray,mnist]"; \
	fi
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/diredi demo

# The whole default suite: unit, vectors, security, integration (incl. PostgreSQL), audits.
# Slow tests (marked `slow`) and the slow benchmark profile are left out; see test-slow.
test: $(STAMP)
	./scripts/ensure_postgres.sh
	$(BIN)/python scripts/gen_protos.py --check
	$(MAKE) --no-print-directory proto-check node-deps
	$(BIN)/ruff check .
	$(BIN)/mypy diredi_secure
	$(BIN)/mypy services audits benchmarks
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy diredi_secure
	$(BIN)/mypy services audits benchmarks

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

protos-check: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

# The wire contract for other languages (docs/WIRE.md): buf lint (STANDARD, exceptions in buf.yaml)
# and buf breaking against the released wire v1 (tools/buf/released-wire-v1.json, an image of the
# protos devices run). buf is pinned by tools/buf/package-lock.json and installed with `npm ci`.
BUF := tools/buf/node_modules/.bin/buf
NODE_STAMP := tools/buf/node_modules/.installed
$(NODE_STAMP): tools/buf/package-lock.json
	./tools/ensure_node.sh
	cd tools/buf && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

proto-check: $(NODE_STAMP)
	$(BUF) lint
	$(BUF) breaking --against tools/buf/released-wire-v1.json

# At a release that changes the wire contract: the new baseline every later change is checked against.
proto-baseline: $(NODE_STAMP)
	$(BUF) build --exclude-source-info -o tools/buf/released-wire-v1.json

# Node packages the tests need: buf, and the Node client example's (grpc-js, protobufjs; pinned by
# examples/node/package-lock.json), which tests/integration/test_node_client.py runs.
NODE_CLIENT_STAMP := examples/node/node_modules/.installed
$(NODE_CLIENT_STAMP): examples/node/package-lock.json $(NODE_STAMP)
	cd examples/node && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $(NODE_CLIENT_STAMP)

node-deps: $(NODE_STAMP) $(NODE_CLIENT_STAMP)

# Long fuzz runs with atheris (the default suite replays tests/fuzz/corpus and fixed mutations).
# FUZZ_TARGET: open_packet, signed_header, decode_payload, account_packet; FUZZ_SECONDS per run.
FUZZ_TARGET ?= open_packet
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet "atheris>=2.3"
	mkdir -p tests/fuzz/corpus/$(FUZZ_TARGET) .fuzz-work/corpus-$(FUZZ_TARGET)
	# New units go to the first folder (the work corpus); the regression corpus is only read.
	cd .fuzz-work && PYTHONPATH=.. ../$(BIN)/python -m tests.fuzz.run $(FUZZ_TARGET) \
		corpus-$(FUZZ_TARGET) ../tests/fuzz/corpus/$(FUZZ_TARGET) \
		-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1

bench: $(STAMP)
	$(BIN)/python -m diredi_secure.benchmarks.packet_throughput

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info

# Known-vulnerability audit of the whole locked install set (requirements.lock: every package,
# torch's CPU wheel included, pinned with hashes) with pip-audit, against PyPI's advisory data
# (AUDIT_SERVICE=osv for OSV's). pip-audit runs from a tool venv of its own under $(VENV), so the
# project's environment is not changed, and audits the lock as written (no resolution, no
# install). First one request of the kind pip-audit makes (PyPI: the first locked release's JSON,
# which carries its advisories) tells whether advisories are reachable; where they are not (no
# network, or a mirror without per-release data: pip-audit would skip every package and still
# say "No known vulnerabilities found"), one line says the lock was NOT audited (exit 0;
# AUDIT_STRICT=1 makes it exit 2). Found advisories fail the target.
AUDIT_SERVICE ?= pypi
AUDIT_STRICT ?=
AUDIT_VENV := $(VENV)/audit-tools
AUDIT_PROBE := $(shell sed -n 's/^\([A-Za-z0-9_.-]*\)==\([^ ]*\) .*/\1\/\2/p' requirements.lock 2>/dev/null | head -n 1)
AUDIT_URL = $(if $(filter osv,$(AUDIT_SERVICE)),https://api.osv.dev/v1/query,https://pypi.org/pypi/$(AUDIT_PROBE)/json)
AUDIT_QUERY = $(if $(filter osv,$(AUDIT_SERVICE)),{"package": {"name": "$(firstword $(subst /, ,$(AUDIT_PROBE)))"$(comma) "ecosystem": "PyPI"}$(comma) "version": "$(lastword $(subst /, ,$(AUDIT_PROBE)))"})
comma := ,
.PHONY: audit-deps
audit-deps:
	@if ! $(PYTHON) -c "import sys, urllib.request as u; u.urlopen(u.Request(sys.argv[1], data=sys.argv[2].encode() or None, headers={'Content-Type': 'application/json'}), timeout=10)" "$(AUDIT_URL)" '$(AUDIT_QUERY)' >/dev/null 2>&1; then \
		echo "audit-deps: $(AUDIT_SERVICE) advisories are not reachable from here ($(AUDIT_URL) does not answer): requirements.lock was NOT audited"; \
		test -z "$(AUDIT_STRICT)" || exit 2; exit 0; \
	fi; \
	if ! test -x $(AUDIT_VENV)/bin/pip-audit; then \
		{ $(PYTHON) -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/python -m pip install --quiet "pip-audit>=2.7,<3"; } >/dev/null 2>&1 || { \
			echo "audit-deps: pip-audit could not be installed (no package index reachable?): requirements.lock was NOT audited"; \
			rm -rf $(AUDIT_VENV); test -z "$(AUDIT_STRICT)" || exit 2; exit 0; }; \
	fi; \
	$(AUDIT_VENV)/bin/pip-audit --requirement requirements.lock --require-hashes --disable-pip \
		--vulnerability-service $(AUDIT_SERVICE) --progress-spinner off
