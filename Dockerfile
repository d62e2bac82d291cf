# syntax=docker/dockerfile:1
#
# Two images from one file (README.md, "Deploy"):
#   docker build --target serve -t REGISTRY/gan-serve:TAG .   gRPC server: onnxruntime-gpu with CUDA and cuDNN, no torch
#   docker build --target train -t REGISTRY/gan-train:TAG .   training: torch and its CUDA wheels, for torchrun
# A CPU-only serving image is the same target with ONNX Runtime's CPU build, and none of the CUDA wheels:
#   docker build --target serve --build-arg ORT_PACKAGE=onnxruntime -t REGISTRY/gan-serve:TAG-cpu .
# Offline: `make wheelhouse` downloads every wheel these builds need into wheelhouse/, in the build context. With
# wheels there, every pip step installs from them alone (--no-index); without, from the package index.

# Both images start from a plain Debian. CUDA and cuDNN come as pip wheels: torch's Linux wheels depend on them, and
# onnxruntime-gpu's `cuda` and `cudnn` extras pin the majors it was built against (1.31: CUDA 13, cuDNN 9), which the
# service loads from the wheels at start (onnxruntime.preload_dlls()). Only the driver (libcuda) comes from the host,
# through the NVIDIA container toolkit, as for any CUDA image. Debian 12's python3 is 3.11, the oldest ORT 1.31
# supports; `make wheelhouse` downloads for the same Python (WHEEL_PYTHON), so the two move together.
ARG SERVE_BASE=debian:bookworm-slim
ARG TRAIN_BASE=debian:bookworm-slim
ARG ORT_PACKAGE=onnxruntime-gpu[cuda,cudnn]
ARG ORT_VERSION=1.31.1
ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------------------------------------------------------------
# Serving, build stage: a virtual environment built on the runtime's own base, so its interpreter path matches.
FROM ${SERVE_BASE} AS serve-build
ARG ORT_PACKAGE
ARG ORT_VERSION
# python3 is whatever the pinned base release ships; pinning apt versions as well would only break the build when
# the archive moves on (hadolint DL3008, a warning, is kept for that reason, here and in `serve` and `train`).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only the serving package: without training/ in the build, the wheel holds service/ alone.
COPY pyproject.toml README.md ./
COPY service/ service/
# The base dependencies and the s3 and tracing extras less ONNX Runtime, plus the build ORT_PACKAGE names (the GPU and CPU builds share a package
# directory, so pyproject's marker must not add the GPU one beside a CPU one); then the project without dependencies.
# wheelhouse/ is mounted for this step only, so no wheel lands in a layer.
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    if ls /wheelhouse/*.whl >/dev/null 2>&1; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; fi \
    && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
        deps = p["dependencies"] + p["optional-dependencies"]["s3"] + p["optional-dependencies"]["tracing"]; \
        print(*(d for d in deps if not d.startswith("onnxruntime")), sep="\n")' > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt "${ORT_PACKAGE}==${ORT_VERSION}" \
    && pip install --no-cache-dir --no-deps . \
    && python -c "import onnxruntime, service.server, boto3, opentelemetry.sdk" \
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
# HOME in /tmp for any library that wants a cache directory. NVIDIA_DRIVER_CAPABILITIES: what the NVIDIA container
# toolkit mounts from the host when a GPU is requested; `compute` is libcuda. The CUDA base images set the same, and
# older toolkits mount `utility` alone when it is unset.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    GAN_MODEL_REPOSITORY=/models \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
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
# Podman keeps HEALTHCHECK only in Docker-format images (podman build --format docker).
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
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY training/ training/
# One layer: Python, a virtual environment, torch first at the version the project is tested with, then the project
# with its train extra. `.[train]` is this project from the build context: its dependency ranges live in
# pyproject.toml, which is why hadolint's DL3013 (a warning: "pin versions in pip") is kept here. wheelhouse/ as in
# serve-build.
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && if ls /wheelhouse/*.whl >/dev/null 2>&1; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir ".[train]" \
    && rm -rf /src \
    && groupadd --system --gid 10001 gan \
    && useradd --system --uid 10001 --gid gan --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gan
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /runs
CMD ["python", "-m", "training.run", "--help"]
