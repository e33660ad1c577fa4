# pforeach development tasks.  Run `make help` for a summary.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# Directories that lint/format look at; missing ones are skipped.
LINT_DIRS := $(wildcard pforeach tests examples benchmarks)

PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help install demo test lint format docs bench clean

help: ## Show this help.
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev,bench]'
	touch $@

install: $(VENV)/.installed-dev ## Create .venv and install pforeach with dev extras.

demo: install ## Estimate pi on a private Redis server with two workers.
	$(BIN)/python examples/pi.py --backend redis --workers 2

test: install ## Run the test suite (extra flags via PYTEST_ARGS=...).
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install ## Check style (ruff) and types (mypy).
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)
	$(BIN)/mypy

format: install ## Reformat the code and apply safe lint fixes.
	$(BIN)/ruff format $(LINT_DIRS)
	$(BIN)/ruff check --fix $(LINT_DIRS)

docs: install ## Build the documentation site into site/ (strict).
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(VENV)/.installed-bench ## Run the benchmarks against other task runners.
	$(BIN)/python -m benchmarks

clean: ## Remove the virtualenv, caches and build output.
	rm -rf $(VENV) build dist site .pytest_cache .mypy_cache .ruff_cache
	find . -name '__pycache__' -type d -prune -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -exec rm -rf {} +
