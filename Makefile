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

.PHONY: install run test lint proto proto-check tools clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
		{ echo "pagemeter needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## proto: regenerate the Python code for protos/ into client/pagemeter/v1
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=$(GEN_DIR) --grpc_python_out=$(GEN_DIR) \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=$(GEN_DIR) \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$(GEN_DIR) \
		$(PROTO_SRC)

## run: serve on 127.0.0.1:50051 (metrics on 127.0.0.1:9464) with the embedded store
run: $(STAMP)
	$(BIN)/pagemeter-server --dev-open-access

## lint: buf lint on the contract, ruff and mypy --strict on the code
lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/ruff check server client tests
	$(BIN)/ruff format --check server client tests
	$(BIN)/mypy

## tools: promtool and prometheus for the monitoring tests (tests/test_prometheus_*.py)
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

## test: lint, then the whole test suite against real Redis and gRPC servers
test: lint tools
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(TOOLS) .pagemeter .pytest_cache .mypy_cache .ruff_cache
