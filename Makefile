# The two commands a new user needs: `make run` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
DATA_DIR ?= ./data
CONSUMERS ?= 1

.PHONY: setup run test test-fast lint bench clean

setup:
	@bash scripts/setup.sh

run: setup
	@bash scripts/run.sh --port $(PORT) --data-dir $(DATA_DIR) --consumers $(CONSUMERS)

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
