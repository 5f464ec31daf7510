# pagemeter: every target does its own set-up on a machine with only Python 3.11.
# Python 3.11 or newer: python3.11 if it is on PATH, else python3.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/pagemeter/v1/*.proto)
GEN_DIR := client

.PHONY: install run test lint proto proto-check clean

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

## test: lint, then the whole test suite against real Redis and gRPC servers
test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pagemeter .pytest_cache .mypy_cache .ruff_cache
