# Set-up and everyday commands. Every target creates or reuses the virtual environment in
# $(VENV) and installs what it needs, so each works on a fresh clone.
#
# CPU machines get the CPU build of torch (pinned: an unpinned torch pulls several GB of
# CUDA wheels). On a GPU host, override both, e.g.
#   make test TORCH_REQUIREMENT='torch==2.13.0' TRITON_REQUIREMENT='triton'
# with the CUDA index configured for pip.
#
# The tests also start a real Prometheus and a real Redis: `system-deps` installs Debian's
# `prometheus` and `redis-server` when a binary is missing (as root, or through sudo), without
# starting their services, and `gcc` with the C library's headers, which the fused CPU step
# (kernels/cpu_step.py) compiles with; without a compiler it steps in PyTorch, slower.

PYTHON ?= python3
VENV ?= .venv
TORCH_REQUIREMENT ?= torch==2.13.0
TRITON_REQUIREMENT ?= triton==3.6.0
PYTEST_ARGS ?=
SERVE_ARGS ?=
# The newest Triton on PyPI, alone (no dependencies), for test-triton-latest.
TRITON_LATEST ?= $(VENV)/triton-latest
# gpu-check runs where CUDA is, with that machine's Python, which brings torch and triton;
# gpu-wheels downloads what else memserve needs, for that Python, into GPU_WHEELS.
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEELS ?= .gpu-wheels
GPU_CHECK_ARGS ?=
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Debian packages the tests need, and how to install them here (sudo unless root).
SYSTEM_PACKAGES := prometheus redis-server gcc libc6-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
# invoke-rc.d and deb-systemd-invoke ask this script before starting a service; 101 = no.
POLICY_RC := /usr/sbin/policy-rc.d

.PHONY: setup system-deps serve run test lint typecheck pytest test-triton-latest bench \
	test-protobuf-range gpu-wheels gpu-check protos clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 21

setup: $(STAMP)  ## create .venv and install memserve with its dev tools

# Installs the package only when its binary is missing; `apt-get update` only if the install
# fails without it. The package would start a prometheus service (port 9090) on a host with
# an init system: a temporary policy-rc.d forbids that (an existing one is left as it is).
# The tests start prometheus themselves.
system-deps:  ## install Debian's prometheus, redis-server (the tests start both) and gcc if missing
	@command -v prometheus >/dev/null 2>&1 && command -v redis-server >/dev/null 2>&1 && \
		printf '#include <math.h>\n' | cc -fsyntax-only -x c - >/dev/null 2>&1 && exit 0; \
	command -v apt-get >/dev/null 2>&1 || { \
		echo "prometheus, redis-server or a C compiler is missing and this is no Debian machine: install them yourself" >&2; exit 1; }; \
	set -e; \
	if [ ! -e $(POLICY_RC) ]; then \
		trap '$(SUDO) rm -f $(POLICY_RC)' EXIT; \
		printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee $(POLICY_RC) >/dev/null; \
		$(SUDO) chmod 755 $(POLICY_RC); \
	fi; \
	$(APT_INSTALL) $(SYSTEM_PACKAGES) || { \
		echo "apt-get install failed: updating the package lists and trying again" >&2; \
		$(SUDO) apt-get update -q && $(APT_INSTALL) $(SYSTEM_PACKAGES); }; \
	command -v prometheus >/dev/null && command -v redis-server >/dev/null && command -v cc >/dev/null

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH_REQUIREMENT)' $(if $(TRITON_REQUIREMENT),'$(TRITON_REQUIREMENT)')
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

serve: $(STAMP)  ## set up, then serve the bundled models on 127.0.0.1:50051 (SERVE_ARGS='...')
	$(BIN)/memserve serve $(SERVE_ARGS)

run: $(STAMP)  ## set up, then run the kernel demo (batched NTM steps checked against float64)
	$(BIN)/memserve demo

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)  ## mypy, strict
	$(BIN)/mypy

# checkov (the Kubernetes manifests' misconfiguration checks) has many dependencies of its
# own: it gets an environment of its own, so none of them moves one of memserve's.
TOOLS := $(VENV)/tools
$(TOOLS)/.installed: Makefile
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet 'checkov>=3.2'
	touch $@

pytest: $(STAMP) $(TOOLS)/.installed system-deps  ## the test suite alone
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A Triton release that breaks the kernels must fail here before it reaches a user, so the
# kernel tests run a second time under the newest release on PyPI, resolved at every run.
# It is a `pip install --target` overlay of triton alone (it needs nothing, so torch stays as
# it is), installed again only when PyPI's newest changes, first on PYTHONPATH.
test-triton-latest: $(STAMP)  ## the kernel tests again, under the newest Triton on PyPI
	$(BIN)/python -m tests.kernels.newest_triton $(TRITON_LATEST) -q

# The generated code in protos/ must run on every protobuf pyproject.toml declares (memserve
# installs beside tritonclient, which holds protobuf below 7): it is imported and used under
# the lowest and under PyPI's newest inside the range, each a `pip install --target` overlay
# of protobuf alone, installed once per version.
test-protobuf-range: $(STAMP)  ## protos/ imported and used under the lowest and highest protobuf declared
	$(BIN)/python -m tests.protos.protobuf_range $(VENV)/protobuf-range

test: lint typecheck pytest test-triton-latest test-protobuf-range  ## lint, type-check, the whole suite, the kernel tests under the newest Triton, protos/ across the protobuf range

bench: $(STAMP)  ## kernel benchmark; writes JSON under bench/results/
	$(BIN)/python bench/kernels.py

# Wheels only (the GPU machine may have no compiler), none of their dependencies (the GPU
# image has those, with torch and triton); bench/gpu-wheels.txt says which and why.
gpu-wheels: $(STAMP)  ## download into .gpu-wheels/ the wheels gpu-check installs on a GPU machine
	rm -rf $(GPU_WHEELS)
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON_VERSION) $(addprefix --platform ,$(GPU_PLATFORMS)) \
		-d $(GPU_WHEELS) -r bench/gpu-wheels.txt
	@du -sh $(GPU_WHEELS)

# No .venv here: this runs on the GPU machine, with its own Python (GPU_CHECK_ARGS='--dry-run'
# GPU_PYTHON=.venv/bin/python tries the whole flow on a CPU).
gpu-check:  ## on a CUDA machine: GPU tests and benchmarks in < 8 min (bench/gpu_check.py)
	$(GPU_PYTHON) bench/gpu_check.py --wheels $(GPU_WHEELS) $(GPU_CHECK_ARGS)

# protos/inference/ is the Open Inference Protocol as Triton publishes it; its generated code
# keeps its descriptors in a pool of its own (protos/inference/pool.py says why).
protos: $(STAMP)  ## regenerate protos/**/*_pb2*.py from the .proto files
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/memserve.proto
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. protos/journal.proto
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/inference/grpc_service.proto
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. protos/inference/model_config.proto
	$(BIN)/python -m protos.inference.pool protos/inference/grpc_service_pb2.py \
		protos/inference/model_config_pb2.py

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
