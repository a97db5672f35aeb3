# driftloop task vocabulary: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export BENTOML_DO_NOT_TRACK := True
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: help install demo test test-fast lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install driftloop with dev extras

DEMO_ARGS ?=
demo: $(STAMP) ## run the whole adaptive loop on the embedded stack (DEMO_ARGS="--help")
	$(BIN)/driftloop demo $(DEMO_ARGS)

test: $(STAMP) ## install if needed, then run the whole suite
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## unit tests only
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP) ## ruff and mypy on src/
	$(BIN)/ruff check src flows bentos tests benchmarks
	$(BIN)/mypy src

bench: $(STAMP) ## run the benchmarks (prints numbers, writes benchmarks/results/*.json)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean: ## remove local state (.driftloop/) and caches
	rm -rf .driftloop .pytest_cache .mypy_cache .ruff_cache
