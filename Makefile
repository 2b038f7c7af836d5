# DiReDi-secure. Two commands do all set-up on a fresh machine:
#   make demo   -- create .venv, install, run the main job
#   make test   -- same set-up, then the whole suite (what CI runs)
# The torch pin is installed first and alone: an unpinned torch (or one pulled in by opacus)
# would download a multi-GB CUDA build. Override with e.g. `make TORCH=torch==2.14.1 test`.

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

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,ray,mnist]"  # ray after the torch pin: it pulls no torch
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
