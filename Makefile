# Plain entry points. `make test` on a fresh machine creates .venv, installs everything, runs the suite; `make serve`
# installs the serving dependencies alone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve
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

# Offline image builds (README.md, "Build offline from a wheelhouse"): every wheel the `serve` and `train` images
# install, for the images' platform rather than this machine's: CPython WHEEL_PYTHON on x86_64 with glibc
# 2.WHEEL_GLIBC, so wheels built for that glibc or an older one (Debian 12, the Dockerfile's default base). The
# versions are the Dockerfile's ARG defaults, so they are set in one place; ORT_PACKAGE=onnxruntime gathers the
# CPU-only serving image's wheels instead.
WHEELHOUSE := wheelhouse
WHEEL_PYTHON ?= 3.11
WHEEL_GLIBC ?= 36
dockerfile_arg = $(shell sed -n 's/^ARG $(1)=//p' Dockerfile)
ORT_PACKAGE ?= $(call dockerfile_arg,ORT_PACKAGE)
ORT_VERSION := $(call dockerfile_arg,ORT_VERSION)
TORCH_VERSION := $(call dockerfile_arg,TORCH_VERSION)
# pip expands none of the newer manylinux tags on its own, so each glibc from WHEEL_GLIBC down is named, with the
# legacy aliases some wheels carry alone.
WHEEL_TARGET := --only-binary=:all: --python-version $(WHEEL_PYTHON) --implementation cp \
	$(foreach v,$(shell seq $(WHEEL_GLIBC) -1 5),--platform manylinux_2_$(v)_x86_64) \
	--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64
WHEEL_SET := torch==$(TORCH_VERSION) $(ORT_PACKAGE)==$(ORT_VERSION) $(WHEEL_PYTHON) $(WHEEL_GLIBC) $(TORCH_PIP_ARGS)
WHEEL_STAMP := $(WHEELHOUSE)/.downloaded-$(shell printf '%s' '$(WHEEL_SET)' | cksum | cut -d' ' -f1)

.PHONY: setup test validate lint proto-release serve train clean wheelhouse image-test fleet-test

setup: $(STAMP)

# The CPU path pins torch first so that the `train` extra's range is already met
# and pip never reaches for the multi-gigabyte CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_PIP_ARGS) $(TORCH_CPU)
	$(PY) -m pip install -e '.[train,dev]'
	touch $(SERVE_STAMP) $(STAMP)

# Serving alone needs the base package only: no torch, onnx or dev tools. A full install (above) includes it.
$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e .
	touch $(SERVE_STAMP)

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

# Three replicas on one S3 repository (SeaweedFS) behind Envoy (deploy/envoy/envoy.yaml) and behind the client's
# round_robin, under load: balance, publish and roll back, SIGTERM, a 30 s store outage (README.md, "Fleet"). About
# 75 s; `make test` runs it too, as one more tier. -rP prints each phase's figures.
fleet-test: setup
	$(PY) -m pytest -m fleet -rP

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Loopback by default: a fresh machine's first server is reachable from that machine only, and its admin API works as
# the README's examples call it. `make serve SERVE_ARGS=` binds every interface, as the server itself does.
SERVE_ARGS ?= --host 127.0.0.1
serve: $(SERVE_STAMP)
	$(PY) -m service $(SERVE_ARGS)

train: setup
	$(PY) -m training.run --preset $(PRESET) $(ARGS)

# torch first, from TORCH_PIP_ARGS's index where one is given, so that the second download finds that build (the CPU
# one, say) in the wheelhouse instead of the index's. Then ONNX Runtime, the project's dependencies with the train
# extra, and setuptools, which builds the project inside the image. Files already there are not fetched again.
wheelhouse: $(WHEEL_STAMP)

$(WHEEL_STAMP): pyproject.toml | $(SERVE_STAMP)
	$(PY) -m pip download --dest $(WHEELHOUSE) $(WHEEL_TARGET) $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION)
	$(PY) -m pip download --dest $(WHEELHOUSE) $(WHEEL_TARGET) --find-links $(WHEELHOUSE) \
		torch==$(TORCH_VERSION) '$(ORT_PACKAGE)==$(ORT_VERSION)' '.[train,s3,tracing]' 'setuptools>=68'
	touch $@

# Builds both images from the wheelhouse (the serving one with ONNX Runtime's CPU build) and runs them as a cluster
# would: deploy/image_test.py says what it checks, and installs podman and its helpers where they are missing. The
# full install, for the S3 store it serves from (SeaweedFS, from the dev extra).
image-test: $(STAMP)
	$(MAKE) wheelhouse ORT_PACKAGE=onnxruntime
	$(PY) deploy/image_test.py

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache build *.egg-info
