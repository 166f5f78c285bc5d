# The two commands a fresh machine needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.adaptflow-installed

.PHONY: install run test test-all lint typecheck unit integration clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject and install from local disk here.
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Main job on the embedded default (SQLite MLflow + kfp.local): demo data, pretrain, full DAG.
run: $(STAMP)
	$(BIN)/adaptflow demo

lint: $(STAMP)
	$(BIN)/ruff check src components pipelines tests bench
	$(BIN)/ruff format --check src components pipelines tests bench

typecheck: $(STAMP)
	$(BIN)/mypy src components pipelines

## Everything CI runs: lint, types, unit, integration and stack tests (not `slow`, not `container`).
test: lint typecheck
	$(BIN)/pytest -m "not slow and not container" -p no:cacheprovider

## Also the slow experiments (the transfer-vs-fine-tune evidence) and the container build.
test-all: lint typecheck
	$(BIN)/pytest -p no:cacheprovider

clean:
	rm -rf .adaptflow build *.egg-info
