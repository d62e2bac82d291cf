"""Server configuration: one tree of frozen dataclasses, holding the only defaults and the only validation.

Every leaf is a flag and a GAN_<FLAG> environment variable. Flags are flat (`--max-batch-size`, not
`--batching.max-batch-size`); a leaf's flag is its field name unless its metadata names another.
Imports nothing heavy, so that `python -m service.probe` starts fast.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import math
import os
import sys
import tokenize
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from service.repository import NAME, VersionPolicy

ENV_PREFIX = "GAN_"
JSON_BYTES = 8 << 20  # max_json_bytes's default


def _flag(name: str):
    """A field whose flag and variable are named `name` rather than after the field."""
    return {"flag": name}


def _check(section, minimum: float, *names: str) -> None:
    """Each named field must be a finite number >= minimum; the message names its flag."""
    flags = {f.name: f.metadata.get("flag", f.name) for f in dataclasses.fields(section)}
    for name in names:
        value = getattr(section, name)
        if not (math.isfinite(value) and value >= minimum):
            raise ValueError(f"{flags[name]}: must be >= {minimum} (got {value})")


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching, per model version; see Triton's dynamic_batching for the same ideas."""

    max_batch_size: int = 128  # samples per ONNX Runtime run, at most
    # The size batches are formed at, and requests split at. 0: measured when a version loads (the smallest size
    # within batcher.SIZE_TOLERANCE of the best time per sample), as Triton's preferred_batch_size but measured
    # rather than configured.
    preferred_batch_size: int = 0
    max_delay_ms: float = 2.0  # how long the oldest queued chunk may wait for company
    max_queue: int = 8192  # queued samples before RESOURCE_EXHAUSTED
    # Concurrent runs per model version, each on a thread of its own. 0: one per usable core on CPU, where
    # single-threaded runs side by side beat one run on every thread (bench/README.md), and 2 on a GPU.
    workers: int = field(default=0, metadata=_flag("batch_workers"))
    enabled: bool = field(default=True, metadata=_flag("batching"))  # off: every request runs alone
    # On: wait max_delay_ms only while requests arrive together, so a lone caller never pays it.
    # Off: always wait, as Triton and TF Serving do.
    adaptive: bool = field(default=True, metadata=_flag("adaptive_delay"))
    # Where measured batch-size profiles are kept (service/profiles.py), so that restarts and reloads neither time
    # the model again nor choose differently. "auto": $XDG_CACHE_HOME/gan-serve or ~/.cache/gan-serve; "": none.
    profile_cache: str = "auto"

    def __post_init__(self) -> None:
        _check(self, 1, "max_batch_size", "max_queue")
        _check(self, 0, "max_delay_ms", "workers", "preferred_batch_size")
        if self.preferred_batch_size > self.max_batch_size:
            raise ValueError(
                f"preferred_batch_size: {self.preferred_batch_size} is over max_batch_size {self.max_batch_size}"
            )


@dataclass(frozen=True)
class RuntimeConfig:
    """ONNX Runtime sessions."""

    # "auto": CUDA where the build offers it and an NVIDIA driver is loaded, else CPU.
    # Or an explicit comma-separated ONNX Runtime provider list (TensorrtExecutionProvider first for TensorRT).
    providers: str = "auto"
    # Per-provider options, e.g. "CUDAExecutionProvider:cudnn_conv_algo_search=HEURISTIC,device_id=1;
    # TensorrtExecutionProvider:trt_fp16_enable=1" (ONNX Runtime's own option names and values).
    provider_options: str = ""
    # CUDA graphs (CUDA provider only): one captured graph per power-of-two batch size up to max_batch_size, each
    # batch padded to its bucket; every bucket is captured at load. A graph session runs one batch at a time.
    cuda_graph: bool = False
    tensorrt_cache: str = ""  # TensorRT provider: directory of its engine and timing caches ("" = no cache)
    intra_op_threads: int = 1  # threads per run; 0 = ONNX Runtime's default, one per physical core
    inter_op_threads: int = 1  # threads running a graph's independent nodes side by side; 0 = ORT's default
    # Spinning threads burn the cores the gRPC threads need on small machines (measured: +15% throughput
    # for a batching server on 2 vCPUs with it off), so it is off unless asked for.
    allow_spinning: bool = False

    def __post_init__(self) -> None:
        _check(self, 0, "intra_op_threads", "inter_op_threads")
        parse_provider_options(self.provider_options)


def parse_provider_options(text: str) -> dict[str, dict[str, str]]:
    """ "Provider:key=value,key=value;Provider:..." → {provider: {key: value}}; errors name provider_options."""
    options: dict[str, dict[str, str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        provider, colon, pairs = part.partition(":")
        provider = provider.strip()
        if not colon or not provider.endswith("ExecutionProvider"):
            raise ValueError(f"provider_options: {part[:64]!r} is not 'NameExecutionProvider:key=value,...'")
        for pair in filter(None, (p.strip() for p in pairs.split(","))):
            key, equals, value = (x.strip() for x in pair.partition("="))
            if not (equals and key and value):
                raise ValueError(f"provider_options: {pair[:64]!r} in {provider} is not key=value")
            options.setdefault(provider, {})[key] = value
    return options


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how responses are cut."""

    max_images: int = 1024  # per Generate / Interpolate request
    max_stream_images: int = 65536  # per GenerateStream request
    stream_chunk: int = 64  # images per streamed message (fewer when they would not fit in half a message)
    max_message_bytes: int = 64 << 20  # a gRPC message or HTTP body, either way
    # JSON request bodies over HTTP: parsing JSON costs far more per byte than binary tensors, which
    # max_message_bytes bounds, so JSON gets a limit of its own, well below it.
    max_json_bytes: int = JSON_BYTES
    encoder_threads: int = 2  # PNG encoding and seed expansion, off the event loop
    # Answers to Generate by seeds kept for identical requests (service/cache.py), in bytes; 0: no cache.
    response_cache_bytes: int = 0
    http_deadline_s: float = 60.0  # the deadline of an HTTP request that sets none of its own; 0 = none

    def __post_init__(self) -> None:
        _check(self, 1, "max_images", "max_stream_images", "stream_chunk", "max_message_bytes", "encoder_threads")
        _check(self, 1, "max_json_bytes")
        _check(self, 0, "http_deadline_s", "response_cache_bytes")
        json_bytes, message_bytes = self.max_json_bytes, self.max_message_bytes
        if json_bytes > message_bytes:
            if json_bytes != JSON_BYTES:
                raise ValueError(f"max_json_bytes: must be <= max_message_bytes ({message_bytes}) (got {json_bytes})")
            # The default follows a smaller message limit down, so that setting only that one keeps working.
            object.__setattr__(self, "max_json_bytes", self.max_message_bytes)


@dataclass(frozen=True)
class Lifecycle:
    """Shutdown and connection ageing."""

    grace_seconds: float = 25.0  # drain time after SIGTERM; below terminationGracePeriodSeconds
    # Behind an L4 load balancer (a Kubernetes ClusterIP Service) one HTTP/2 connection stays pinned to one pod:
    # a GOAWAY after this many seconds (±10% jitter, added by gRPC) makes clients reconnect and rebalance.
    max_connection_age_s: float = 0.0  # 0 = connections live as long as the client keeps them
    max_connection_age_grace_s: float = 30.0  # then calls still running on the old connection get this long
    # An HTTP connection must send its request headers within this many seconds, and may stay idle no longer
    # before its first request: slow or silent clients would otherwise each hold a connection for ever.
    header_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _check(self, 0, "grace_seconds", "max_connection_age_s", "max_connection_age_grace_s", "header_timeout_s")
        if not self.header_timeout_s:  # no limit would be the slow-client exposure this setting exists to close
            raise ValueError("header_timeout_s: must be > 0 (got 0)")


MODEL_CONTROL = ("none", "poll", "explicit")


@dataclass(frozen=True)
class ModelControl:
    """Which models and versions are served, and when the repository is looked at again (README, "Model lifecycle").

    SIGHUP rescans the repository in every mode.
    """

    # none: what the repository holds at start; poll: rescan every poll_seconds;
    # explicit: only what load_model names and the ModelAdmin service asks for.
    mode: str = field(default="none", metadata=_flag("model_control"))
    poll_seconds: float = 10.0  # poll mode: the time between two rescans
    load_model: tuple[str, ...] = ()  # explicit mode: models loaded at start (the flag repeats)
    # all | latest:N | specific:1,3 — the default for every model; <repository>/<name>/model.json may override it.
    # latest:1, as TF Serving and Triton: a new version replaces the old one once it is ready, and memory stays at
    # one session per model. Clients that pin versions list them with specific:, or use all.
    version_policy: str = "latest:1"

    def __post_init__(self) -> None:
        names = (self.load_model,) if isinstance(self.load_model, str) else tuple(self.load_model)
        object.__setattr__(self, "load_model", names)
        if self.mode not in MODEL_CONTROL:
            raise ValueError(f"model_control: must be one of {', '.join(MODEL_CONTROL)} (got {self.mode!r})")
        _check(self, 0.1, "poll_seconds")
        VersionPolicy.parse(self.version_policy, "version_policy")
        if self.load_model and self.mode != "explicit":
            raise ValueError("load_model: only with --model-control explicit (other modes load every model)")
        for name in self.load_model:
            if not NAME.fullmatch(name):
                raise ValueError(f"load_model: {name[:64]!r} is not a model name (letters, digits, '.', '_', '-')")


@dataclass(frozen=True)
class ObjectStore:
    """An s3:// model repository (README, "Models in object storage"). Credentials come from AWS's standard chain
    (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and the shared files, web identity, container and
    instance roles), never from a flag: a command line is readable by every process on the machine."""

    s3_endpoint: str = ""  # an S3-compatible store, http(s)://host:port; empty: AWS_ENDPOINT_URL, else AWS itself
    s3_region: str = ""  # empty: AWS_REGION or the profile's
    # Where versions are downloaded before they are opened. "auto": $XDG_CACHE_HOME/gan-serve/models
    # (~/.cache/gan-serve/models), which is /tmp/.cache/... in the image, so that the root filesystem can be read-only.
    model_cache: str = "auto"
    max_model_bytes: int = 2 << 30  # a model.onnx object larger than this is refused (ONNX's own limit is 2 GiB)

    def __post_init__(self) -> None:
        _check(self, 1, "max_model_bytes")
        if not self.model_cache:
            raise ValueError("model_cache: must name a directory, or be auto")
        if self.s3_endpoint and not self.s3_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"s3_endpoint: expected http(s)://host[:port] (got {self.s3_endpoint[:64]!r})")


@dataclass(frozen=True)
class Security:
    """TLS, mutual TLS and bearer tokens (see README, "Security"). All off by default, as `make serve` runs."""

    tls_cert: str = ""  # PEM certificate chain; with tls_key, the gRPC port speaks TLS
    tls_key: str = ""  # PEM private key
    tls_client_ca: str = ""  # PEM CA: clients must present a certificate it signed (mutual TLS)
    auth_tokens_file: str = ""  # `<name> <role> <token>` lines; calls then need `authorization: Bearer <token>`
    reflection: bool = True  # server reflection; it needs a token when tokens are on
    full_metadata: bool = False  # GetModel serves every metadata key, not only the documented ones
    # ganserve.v1.ModelAdmin. auto: served with tokens (it needs the admin role) or on a loopback --host, so that
    # nobody who merely reaches an open port can unload models; on; off.
    admin_api: str = "auto"

    def __post_init__(self) -> None:
        if self.admin_api not in ("auto", "on", "off"):
            raise ValueError(f"admin_api: must be auto, on or off (got {self.admin_api!r})")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert: give tls_cert and tls_key together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca: mutual TLS needs tls_cert and tls_key as well")


@dataclass(frozen=True)
class ServerConfig:
    model_repository: str = "models"  # a directory, or s3://BUCKET/PREFIX (README, "Models in object storage")
    host: str = "[::]"  # the gRPC, HTTP and metrics endpoints all bind here
    port: int = 50051  # 0 picks a free port
    # HTTP: Open Inference Protocol REST, PNG endpoints, the playground and /metrics. 0 picks a free port; -1: off.
    http_port: int = 8000
    metrics_port: int = 9090  # 0 picks a free port; -1 disables the HTTP endpoint
    metrics_host: str = ""  # the metrics endpoint's address; empty: the same as host
    # A second, plaintext port serving only grpc.health.v1, for kubelet probes, which cannot do TLS or tokens.
    health_port: int = -1  # 0 picks a free port; -1: none (health is on the main port in any case)
    # gRPC sets SO_REUSEPORT by default, so a second server on a taken port would start and silently take half
    # the connections. Off: a taken port stops the start. On: share it on purpose (Triton's --reuse-grpc-port),
    # and the HTTP port with it (--workers turns it on).
    reuse_grpc_port: bool = False
    # Serving processes sharing the ports (SO_REUSEPORT) under one parent (service/workers.py): one event loop per
    # core for small requests. 1: this process serves.
    workers: int = 1
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    limits: Limits = field(default_factory=Limits)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    models: ModelControl = field(default_factory=ModelControl)
    store: ObjectStore = field(default_factory=ObjectStore)
    security: Security = field(default_factory=Security)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers: must be >= 1 (got {self.workers})")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in 0..65535 (got {self.port})")
        for name in ("http_port", "metrics_port", "health_port"):
            if not -1 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name}: must be in -1..65535 (got {getattr(self, name)})")
        ports = [p for p in (self.port, self.http_port, self.metrics_port, self.health_port) if p > 0]
        if len(set(ports)) != len(ports):
            raise ValueError(f"port: port, http_port, metrics_port and health_port must differ (got {ports})")
        if self.batching.max_queue < self.limits.max_images:
            raise ValueError(
                f"max_queue: must be >= max_images ({self.limits.max_images}), or big requests could never run"
            )

    @classmethod
    def from_flags(cls, **values: typing.Any) -> ServerConfig:
        """Build the tree from flat flag names (`max_batch_size=32`); unknown names raise TypeError."""
        sections: dict[str, dict[str, typing.Any]] = {}
        top: dict[str, typing.Any] = {}
        known = {flag: (section, name) for flag, section, name, _ in _leaves()}
        for flag, value in values.items():
            if flag not in known:
                raise TypeError(f"unknown setting {flag!r}")
            section, name = known[flag]
            (sections.setdefault(section, {}) if section else top)[name] = value
        hints = typing.get_type_hints(cls)
        return cls(**top, **{s: hints[s](**kw) for s, kw in sections.items()})


def _leaves() -> Iterator[tuple[str, str | None, str, typing.Any]]:
    """(flag, section or None, field name, type) for every leaf of ServerConfig, in declaration order."""
    hints = typing.get_type_hints(ServerConfig)
    for f in dataclasses.fields(ServerConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            inner = typing.get_type_hints(hints[f.name])
            for g in dataclasses.fields(hints[f.name]):
                yield g.metadata.get("flag", g.name), f.name, g.name, inner[g.name]
        else:
            yield f.name, None, f.name, hints[f.name]


def flags() -> list[str]:
    """Every setting's flag name (its variable is GAN_ + the name in capitals)."""
    return [flag for flag, *_ in _leaves()]


def _default(section: str | None, name: str) -> typing.Any:
    return getattr(ServerConfig() if section is None else getattr(ServerConfig(), section), name)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def comments() -> dict[str, str]:
    """Each setting's comment in this file, by flag: the one on its line, else the lines just above it. It is what
    `--help` says of the flag, so that the defaults, their reasons and the help text live in one place."""
    source = inspect.getsource(sys.modules[__name__])
    lines = source.splitlines()
    fields: dict[tuple[str, str], str] = {}
    for cls in ast.parse(source).body:
        for node in cls.body if isinstance(cls, ast.ClassDef) else ():
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            words = [t.string for t in tokenize.generate_tokens(io.StringIO(lines[node.lineno - 1]).readline)
                     if t.type == tokenize.COMMENT]  # fmt: skip
            above, block = node.lineno - 2, []
            while above >= 0 and lines[above].strip().startswith("#"):
                block.insert(0, lines[above].strip())
                above -= 1
            words = words or block
            fields[(cls.name, node.target.id)] = " ".join(w.lstrip("#").strip() for w in words)
    hints = typing.get_type_hints(ServerConfig)
    owner = {f.name: hints[f.name].__name__ for f in dataclasses.fields(ServerConfig)}
    return {flag: fields.get((owner.get(section, "ServerConfig"), name), "") for flag, section, name, _ in _leaves()}


def parse(argv: list[str] | None = None, environ: Mapping[str, str] = os.environ) -> ServerConfig:
    """Flags override GAN_* environment variables, which override the defaults."""
    p = argparse.ArgumentParser(
        prog="python -m service", description="Serve ONNX GAN generators over gRPC and HTTP.",
        epilog="Every flag also reads its GAN_<FLAG> environment variable; a flag given wins. README.md explains each.",
    )  # fmt: skip
    said = comments()
    repeats: dict[str, tuple[str, ...]] = {}
    for flag, section, name, kind in _leaves():
        env = ENV_PREFIX + flag.upper()
        default = _default(section, name)
        repeated = typing.get_origin(kind) is tuple
        if env in environ:
            try:
                if repeated:  # comma-separated
                    default = tuple(v.strip() for v in environ[env].split(",") if v.strip())
                else:
                    default = (_parse_bool if kind is bool else kind)(environ[env])
            except ValueError as e:
                raise SystemExit(f"error: {env}: {e}") from None
        option = "--" + flag.replace("_", "-")
        what = f"{said[flag].rstrip('.')}. ".replace("%", "%%") if said[flag] else ""  # argparse formats help with %
        if repeated:
            p.add_argument(option, action="append", default=None, help=f"{what}env {env} (comma-separated); repeatable")
            repeats[flag] = default
        elif kind is bool:
            p.add_argument(option, action=argparse.BooleanOptionalAction, default=default, help=f"{what}env {env}")
        else:
            shown = repr(default) if isinstance(default, str) else default
            p.add_argument(option, type=kind, default=default, help=f"{what}env {env} (default {shown})")
    args = vars(p.parse_args(argv))
    for flag, default in repeats.items():  # flags given replace the variable's list, as for every other setting
        args[flag] = tuple(args[flag]) if args[flag] is not None else default
    try:
        return ServerConfig.from_flags(**args)
    except ValueError as e:
        p.error(str(e))
        raise
