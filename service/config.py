"""Server configuration: one frozen dataclass. Every field is a flag and a GAN_<FIELD> environment variable."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass

if typing.TYPE_CHECKING:  # imported where used, so that `python -m service.probe` starts fast
    from service.batcher import BatchConfig
    from service.runtime import RuntimeConfig
    from service.sampling import Limits

ENV_PREFIX = "GAN_"


@dataclass(frozen=True)
class ServerConfig:
    model_repository: str = "models"
    host: str = "[::]"
    port: int = 50051  # 0 picks a free port
    metrics_port: int = 9090  # 0 picks a free port; -1 disables the HTTP endpoint
    # Dynamic batching, per model version
    max_batch_size: int = 128
    max_delay_ms: float = 2.0  # waited only under concurrency: a lone request never pays it
    max_queue: int = 8192  # queued samples before RESOURCE_EXHAUSTED
    # Two single-threaded ONNX Runtime runs in parallel beat one run on two threads here (P1 in bench/README.md)
    batch_workers: int = 2  # concurrent ONNX Runtime runs per model version
    batching: bool = True  # off: every request runs alone (for comparison)
    # ONNX Runtime
    providers: str = "auto"
    intra_op_threads: int = 1  # per run; 0 = ONNX Runtime's default (all cores)
    inter_op_threads: int = 1
    allow_spinning: bool = False
    # Limits
    max_images: int = 1024
    max_stream_images: int = 65536
    stream_chunk: int = 64
    max_message_bytes: int = 64 << 20
    encoder_threads: int = 2  # PNG encoding, off the event loop
    # Lifecycle
    grace_seconds: float = 25.0  # drain time after SIGTERM; below terminationGracePeriodSeconds
    # Behind an L4 load balancer (a Kubernetes ClusterIP Service) one HTTP/2 connection stays pinned to one pod:
    # a GOAWAY after this many seconds (±10% jitter, added by gRPC) makes clients reconnect and rebalance.
    max_connection_age_s: float = 0.0  # 0 = connections live as long as the client keeps them
    max_connection_age_grace_s: float = 30.0  # then calls still running on the old connection get this long

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "batch_workers", "max_images", "stream_chunk", "encoder_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if self.max_queue < self.max_images:
            raise ValueError(f"max_queue: must be >= max_images ({self.max_images}), or big requests could never run")
        for name in ("max_delay_ms", "grace_seconds", "max_connection_age_s", "max_connection_age_grace_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (got {getattr(self, name)})")

    def batch(self) -> BatchConfig:
        from service.batcher import BatchConfig

        return BatchConfig(
            self.max_batch_size, self.max_delay_ms / 1000, self.max_queue, self.batch_workers, self.batching
        )

    def runtime(self) -> RuntimeConfig:
        from service.runtime import RuntimeConfig

        return RuntimeConfig(self.providers, self.intra_op_threads, self.inter_op_threads, self.allow_spinning)

    def limits(self) -> Limits:
        from service.sampling import Limits

        return Limits(self.max_images, self.max_stream_images, self.stream_chunk)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse(argv: list[str] | None = None, environ: typing.Mapping[str, str] = os.environ) -> ServerConfig:
    """Flags override GAN_* environment variables, which override the defaults."""
    hints = typing.get_type_hints(ServerConfig)
    defaults: dict[str, typing.Any] = {}
    for f in dataclasses.fields(ServerConfig):
        env = ENV_PREFIX + f.name.upper()
        if env in environ:
            try:
                defaults[f.name] = (_parse_bool if hints[f.name] is bool else hints[f.name])(environ[env])
            except ValueError as e:
                raise SystemExit(f"error: {env}: {e}") from None
    p = argparse.ArgumentParser(prog="python -m service", description="Serve ONNX GAN generators over gRPC.")
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        env = ENV_PREFIX + f.name.upper()
        if hints[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f"env {env}")
        else:
            p.add_argument(flag, type=hints[f.name], default=default, help=f"env {env} (default {default})")
    args = p.parse_args(argv)
    try:
        return ServerConfig(**vars(args))
    except ValueError as e:
        p.error(str(e))
        raise
