# Plain entry points. `make test` on a fresh machine creates .venv, installs everything, runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0
# Where pip finds that CPU build. Empty means the configured index; on a stock Linux machine use
#   make setup TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# so that pip does not pick the CUDA build.
TORCH_PIP_ARGS ?=

PRESET ?= mnist-cdcgan
ARGS ?=

.PHONY: setup test validate lint serve train clean

setup: $(STAMP)

# The CPU path pins torch first so that the `train` extra's range is already met
# and pip never reaches for the multi-gigabyte CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_PIP_ARGS) $(TORCH_CPU)
	$(PY) -m pip install -e '.[train,dev]'
	touch $(STAMP)

test: lint validate
	$(PY) -m pytest

# Renders every kustomization under deploy/, checks the built-in kinds with kubernetes-validate --strict (CRD kinds
# such as ServiceMonitor and cert-manager's Certificate have no schema there and are skipped by name) and lints
# the Dockerfile with hadolint.
validate: setup
	$(PY) deploy/validate.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

serve: setup
	$(PY) -m service

train: setup
	$(PY) -m training.run --preset $(PRESET) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
