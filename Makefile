# Two commands on a fresh machine: `make demo` and `make test`. Everything else is for developers.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch for developer and CI machines; the trainer image installs the CUDA build instead.
# It is installed before the project so that the `train` extra's unpinned torch never upgrades it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=
# `make test` and CI run every test: a developer's opt-out of a tool (FTRECIPE_TESTS_WITHOUT=helm,torch,
# tests/skips.py) never reaches setup or pytest here, so a missing helm or torch fails instead of skipping.
unexport FTRECIPE_TESTS_WITHOUT

.PHONY: demo test lint typecheck pytest crds setup clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[train,dev]'
	@bash scripts/fetch-helm.sh
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

demo: $(STAMP)
	@bash scripts/demo.sh

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check operator tests benchmarks
	$(BIN)/ruff format --check operator tests benchmarks
	$(BIN)/lint-imports  # the package's layers: [tool.importlinter] in pyproject.toml

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Regenerate the CRD from the API models (tests fail when crds/ is stale).
crds: $(STAMP)
	$(BIN)/ftrecipe crd --out crds/finetunerecipes.ftrecipe.dev.yaml
	$(MAKE) --no-print-directory chart-crds

clean:
	rm -rf $(VENV) .cache output .pytest_cache .mypy_cache .ruff_cache

# Container images (images/README.md). Built from the repository root; the tag is the package version.
.PHONY: image-operator image-trainer chart-crds
DOCKER ?= docker
IMAGE_REGISTRY ?= ghcr.io/ftrecipe
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
FLASH_ATTN ?= false
IMAGE_ARGS = --build-arg VERSION=$(IMAGE_TAG) \
	--build-arg REVISION=$(shell git rev-parse HEAD 2>/dev/null || echo unknown) \
	--build-arg CREATED=$(shell date -u +%Y-%m-%dT%H:%M:%SZ)

image-operator:
	$(DOCKER) build -f images/operator/Dockerfile $(IMAGE_ARGS) -t $(IMAGE_REGISTRY)/ftrecipe:$(IMAGE_TAG) .

image-trainer:
	$(DOCKER) build -f images/trainer/Dockerfile $(IMAGE_ARGS) --build-arg FLASH_ATTN=$(FLASH_ATTN) \
		-t $(IMAGE_REGISTRY)/ftrecipe-trainer:$(IMAGE_TAG) .

# The Helm chart's copy of the CRD (`make crds` refreshes it; tests/test_chart.py fails when they differ).
chart-crds:
	cp crds/finetunerecipes.ftrecipe.dev.yaml charts/ftrecipe-operator/files/crds/finetunerecipes.ftrecipe.dev.yaml
