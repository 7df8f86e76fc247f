# Set-up and everyday commands. Every target creates or reuses the virtual environment in
# $(VENV) and installs what it needs, so each works on a fresh clone.
#
# CPU machines get the CPU build of torch (pinned: an unpinned torch pulls several GB of
# CUDA wheels). On a GPU host, override both, e.g.
#   make test TORCH_REQUIREMENT='torch==2.13.0' TRITON_REQUIREMENT='triton'
# with the CUDA index configured for pip.

PYTHON ?= python3
VENV ?= .venv
TORCH_REQUIREMENT ?= torch==2.13.0
TRITON_REQUIREMENT ?= triton==3.6.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint typecheck pytest bench protos clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

setup: $(STAMP)  ## create .venv and install memserve with its dev tools

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH_REQUIREMENT)' $(if $(TRITON_REQUIREMENT),'$(TRITON_REQUIREMENT)')
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: $(STAMP)  ## set up, then run the kernel demo (the server arrives with the serving issue)
	$(BIN)/memserve demo

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)  ## mypy, strict
	$(BIN)/mypy

pytest: $(STAMP)  ## the test suite alone
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest  ## set up, then lint, type-check and run the whole test suite

bench: $(STAMP)  ## kernel benchmark; writes JSON under bench/results/
	$(BIN)/python bench/kernels.py

protos: $(STAMP)  ## regenerate protos/memserve_pb2*.py from protos/memserve.proto
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/memserve.proto

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
