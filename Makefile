# Two commands on a fresh machine: `make demo` and `make test`. Everything else is for developers.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch for developer and CI machines; the trainer image installs the CUDA build instead.
# It is installed before the project so that the `train` extra's unpinned torch never upgrades it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

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

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Regenerate the CRD from the API models (tests fail when crds/ is stale).
crds: $(STAMP)
	$(BIN)/ftrecipe crd --out crds/finetunerecipes.ftrecipe.dev.yaml

clean:
	rm -rf $(VENV) .cache output .pytest_cache .mypy_cache .ruff_cache
