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

# buf (lint and breaking-change checks of proto/, configured in buf.yaml), from npm's @bufbuild/buf at an exact
# version, in a directory of its own; the stamp carries the version, so a bump reinstalls.
BUF_VERSION := 1.75.0
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
BUF_STAMP := $(TOOLS)/.buf-$(BUF_VERSION)
# The API as last released: what `buf breaking` holds proto/ to.
RELEASED_API := proto/released.txtpb

.PHONY: setup test validate lint proto-release serve train clean

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

# The package's own postinstall only swaps the launcher for the platform binary; without it (--ignore-scripts) the
# launcher finds that binary itself, and nothing from the registry runs at install time. node and npm come from
# apt on a machine without them.
$(BUF_STAMP):
	command -v npm >/dev/null || { apt-get update && apt-get install -y --no-install-recommends nodejs npm; }
	npm install --prefix $(TOOLS) --no-save --no-audit --no-fund --ignore-scripts @bufbuild/buf@$(BUF_VERSION)
	$(BUF) --version
	touch $@

# Renders every kustomization under deploy/, checks the built-in kinds with kubernetes-validate --strict (CRD kinds
# such as ServiceMonitor and cert-manager's Certificate have no schema there and are skipped by name) and lints
# the Dockerfile with hadolint. Then buf: lint proto/, and fail on any change to it that breaks clients of the
# released API (buf.yaml says which rules and why).
validate: setup $(BUF_STAMP)
	$(PY) deploy/validate.py
	$(BUF) lint
	$(BUF) breaking --against $(RELEASED_API)

# Records proto/ as the released API. Run it on purpose, in the change that releases new fields, messages or RPCs.
# It refuses a tree that breaks the current image: that failure means existing clients would break, and recording
# it would only hide it (a new major version is a new package beside the old one, which counts as an addition).
# Text format, so that the review shows what the release adds; no source info, so that comments do not churn it.
proto-release: $(BUF_STAMP)
	$(BUF) lint
	$(BUF) breaking --against $(RELEASED_API)
	$(BUF) build --exclude-source-info -o $(RELEASED_API)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

serve: setup
	$(PY) -m service

train: setup
	$(PY) -m training.run --preset $(PRESET) $(ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache build *.egg-info
