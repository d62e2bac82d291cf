# syntax=docker/dockerfile:1
#
# Two images from one file (README.md, "Deploy"):
#   docker build --target serve -t REGISTRY/gan-serve:TAG .   gRPC server: CUDA + cuDNN runtime, onnxruntime-gpu
#   docker build --target train -t REGISTRY/gan-train:TAG .   training: torch and its CUDA wheels, for torchrun
# A CPU-only serving image is the same target on a plain Ubuntu base (the onnxruntime-gpu wheel runs the CPU provider
# without any CUDA library present):
#   docker build --target serve --build-arg SERVE_BASE=ubuntu:24.04 -t REGISTRY/gan-serve:TAG-cpu .

# onnxruntime-gpu 1.31 is built against CUDA 13.0 and cuDNN 9: the base must carry both (the cudnn-runtime
# variant; no compiler, no headers). ORT_VERSION and SERVE_BASE move together.
ARG SERVE_BASE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG ORT_VERSION=1.31.1
# torch's Linux wheels on PyPI bring their own CUDA libraries, so training needs no CUDA base image.
ARG TRAIN_BASE=python:3.12-slim-bookworm
ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------------------------------------------------------------
# Serving, build stage: a virtual environment built on the runtime's own base, so its interpreter path matches.
FROM ${SERVE_BASE} AS serve-build
ARG ORT_VERSION
# Ubuntu's python3 is whatever the pinned base release ships; pinning apt versions as well would only break the
# build when the archive moves on (hadolint DL3008, a warning, is kept for that reason, here and in `serve`).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only the serving package: without training/ in the build, the wheel holds service/ alone. The base dependencies
# select onnxruntime-gpu on Linux x86_64 through environment markers; the pin keeps it on the base's CUDA major.
COPY pyproject.toml README.md ./
COPY service/ service/
RUN pip install --no-cache-dir . "onnxruntime-gpu==${ORT_VERSION}" \
    && python -c "import onnxruntime, service.server" \
    && ! python -c "import torch" 2>/dev/null

# ---------------------------------------------------------------------------------------------------------------------
# Serving image.
FROM ${SERVE_BASE} AS serve
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 gan \
    && useradd --system --uid 10001 --gid gan --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gan
COPY --from=serve-build /opt/venv /opt/venv
# Models baked into the image: the repository's models/ by default, or any model repository inside the build
# context with --build-arg MODELS=path. A volume mounted at /models (deploy/ mounts one) hides them.
ARG MODELS=models
COPY ${MODELS}/ /models/
# Nothing is written outside mounted volumes and /tmp, so the root filesystem can be read-only: no bytecode caches,
# HOME in /tmp for any library that wants a cache directory.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    GAN_MODEL_REPOSITORY=/models
USER 10001:10001
WORKDIR /tmp
# gRPC (GAN_PORT), HTTP: Open Inference Protocol REST, PNG endpoints, playground (GAN_HTTP_PORT), and Prometheus
# metrics (GAN_METRICS_PORT): the ServerConfig defaults.
EXPOSE 50051 8000 9090
# Through the standard grpc.health.v1 service, with the gRPC client already in the image (python -m service.probe)
# rather than a grpc_health_probe binary downloaded at build time: nothing to fetch, pin or checksum. Kubernetes
# ignores HEALTHCHECK and probes the same service natively (deploy/base/deployment.yaml). With GAN_HEALTH_PORT set
# (a plaintext port that serves health only, as the TLS deployment does) it asks there, so it needs no certificate
# or token; otherwise the probe's default, localhost:$GAN_PORT. A shell, because only a shell expands variables.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["/bin/sh", "-c", "\
    if [ \"${GAN_HEALTH_PORT:--1}\" -gt 0 ] 2>/dev/null; then exec python -m service.probe --target localhost:$GAN_HEALTH_PORT; \
    else exec python -m service.probe; fi"]
# The server is PID 1 and handles SIGTERM itself (drain, then exit); arguments after the image name become flags.
ENTRYPOINT ["python", "-m", "service"]
CMD []

# ---------------------------------------------------------------------------------------------------------------------
# Training image: `torchrun --nproc_per_node=N -m training.run --preset NAME --out /runs/NAME` (deploy/train/).
FROM ${TRAIN_BASE} AS train
ARG TORCH_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY training/ training/
# torch first, at the version the project is tested with; the train extra then adds onnx, onnxscript and tqdm.
# `.[train]` is this project from the build context: its dependency ranges live in pyproject.toml, which is why
# hadolint's DL3013 (a warning: "pin versions in pip") is kept here.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir ".[train]" \
    && rm -rf /src \
    && groupadd --system --gid 10001 gan \
    && useradd --system --uid 10001 --gid gan --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gan
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
WORKDIR /runs
CMD ["python", "-m", "training.run", "--help"]
