# The two commands a fresh machine needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.adaptflow-installed

IMAGE ?= adaptflow:dev
BASE_IMAGE ?=
GIT_COMMIT ?=

.PHONY: install run test test-all lint typecheck clean image test-container stack-up stack-down stack-status bench-real bench-shift

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
	$(BIN)/hadolint infra/Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy src components pipelines

## Everything CI runs: lint, types, unit, integration and stack tests (not `slow`, not `container`).
test: lint typecheck
	$(BIN)/pytest -m "not slow and not container" -p no:cacheprovider

## Also the slow experiments (the transfer-vs-fine-tune evidence). The image build is `make test-container`.
test-all: lint typecheck
	$(BIN)/pytest -m "not container" -p no:cacheprovider

## The container image (docker when a daemon answers, else buildah). Override IMAGE=, BASE_IMAGE=, GIT_COMMIT=.
image:
	infra/build-image.sh -t "$(IMAGE)" $(if $(BASE_IMAGE),-b "$(BASE_IMAGE)") $(if $(GIT_COMMIT),-c "$(GIT_COMMIT)")

## Build the image with buildah on a local Debian base and run adaptflow + a KFP component in it (~6 min).
test-container: $(STAMP)
	ADAPTFLOW_REQUIRE_CONTAINER=1 $(BIN)/pytest -m container -p no:cacheprovider tests/integration/test_container.py

## Production-like stack on loopback: PostgreSQL + moto S3 + mlflow server; data kept in .adaptflow/stack.
## `eval "$$(infra/local/stack-up)"` also exports MLFLOW_TRACKING_URI and friends into your shell.
stack-up: $(STAMP)
	@infra/local/stack-up
	@echo '# to use it from this shell: eval "$$(infra/local/stack-up)"' >&2

stack-down:
	@infra/local/stack-down

stack-status:
	@infra/local/stack-status

clean:
	rm -rf .adaptflow build *.egg-info

## Real-data benchmark: Fashion-MNIST split task, sizes 10,50,250 x 3 seeds, table into bench/RESULTS.md.
## Needs `apt-get install dataset-fashion-mnist`; about an hour on 2 CPU cores (pretraining cached in the workdir).
bench-real: $(STAMP)
	$(BIN)/python bench/real_data.py --workdir .adaptflow/real-data --sizes 10,50,250 --seeds 3

## Domain shift on real pairs: the advisor's two shift signals on digits/fashion backbones and targets.
## Reuses bench-real's fashion backbone when it is there; about 30 s once the backbones exist.
bench-shift: $(STAMP)
	$(BIN)/python bench/domain_shift.py --workdir .adaptflow/shift-pairs --fashion-workdir .adaptflow/real-data
