# The two commands a new user needs: `make run` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
DATA_DIR ?= ./data
CONSUMERS ?= 1
# GPUS=all (one consumer per GPU NVML finds) or GPUS=0,1; SIMULATE_GPUS=N for N simulated GPUs
# of GPU_MEMORY_MB each on a machine without one.
GPUS ?=
SIMULATE_GPUS ?= 0
GPU_MEMORY_MB ?= 24576
# RUNTIME=podman: the consumers run model containers on Podman instead of the Docker engine.
RUNTIME ?=

.PHONY: setup run test test-fast lint bench clean

setup:
	@bash scripts/setup.sh

run: setup
	@bash scripts/run.sh --port $(PORT) --data-dir $(DATA_DIR) --consumers $(CONSUMERS) \
		$(if $(GPUS),--gpus $(GPUS)) $(if $(RUNTIME),--runtime $(RUNTIME)) \
		$(if $(filter-out 0,$(SIMULATE_GPUS)),--simulate-gpus $(SIMULATE_GPUS) --gpu-memory-mb $(GPU_MEMORY_MB))

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not docker"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m bench.run

clean:
	rm -rf $(DATA_DIR) .pytest_cache
