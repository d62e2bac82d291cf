"""Prometheus metrics, declared once. Base units, bounded labels (method, model, version, code, provider).

A fresh CollectorRegistry is injected, so tests and several servers in one process never collide. It also
carries the client library's standard process_*, python_gc_* and python_info series, as the default registry would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNKNOWN_MODEL = "unknown"  # the label for requests naming no loaded model: keeps label values bounded


class Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        for standard in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
            registry.register(standard)
        self.requests = Counter(
            "gan_requests", "RPCs handled, by method, model and status code.", ["method", "model", "code"],
            registry=registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "gan_request_duration_seconds", "RPC latency as seen by the server.", ["method", "model"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_wait_seconds = Histogram(
            "gan_queue_wait_seconds", "Time a request chunk waited in the batcher's queue.", ["model", "version"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.run_seconds = Histogram(
            "gan_model_run_seconds", "ONNX Runtime time per formed batch.", ["model", "version"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "gan_batch_size", "Samples per formed batch.", ["model", "version"], buckets=BATCH_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.images = Counter("gan_images_generated", "Images generated.", ["model"], registry=registry)
        # Under --workers (prometheus_client's multiprocess mode) gauges are combined across the workers as their
        # mode says: queued samples summed over the live ones, a version serving where any worker serves it.
        self.queue_depth = Gauge(
            "gan_queue_depth", "Samples waiting in the batcher's queue.", ["model", "version"], registry=registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.model_info = Gauge(
            "gan_model_info", "1 for every model version serving, with its execution provider.",
            ["model", "version", "provider"], registry=registry, multiprocess_mode="livemax",
        )  # fmt: skip
        self.cache_lookups = Counter(
            "gan_response_cache_lookups", "Generate requests looked up in the response cache, by result (hit, miss).",
            ["result"], registry=registry,
        )  # fmt: skip
        self.cache_bytes = Gauge(
            "gan_response_cache_bytes", "Bytes of answers the response cache holds.", registry=registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.auth_failures = Counter(
            "gan_auth_failures", "Calls refused for their credentials, by reason (missing, malformed, unknown, role).",
            ["reason"], registry=registry,
        )  # fmt: skip
        self.cancelled = Counter(
            "gan_cancelled_requests", "Calls ended before their answer, by front end and why (CANCELLED: the client"
            " went away; DEADLINE_EXCEEDED: the deadline passed); their queued work is dropped.",
            ["frontend", "code"], registry=registry,
        )  # fmt: skip
        self.protocol_errors = Counter(
            "gan_http_protocol_errors", "HTTP connections that sent what is not HTTP/1.1 (one log line each).",
            registry=registry,
        )  # fmt: skip
        self.credential_reload_failures = Counter(
            "gan_credential_reload_failures", "Changed TLS or tokens files that could not be used (the old stay).",
            ["file"], registry=registry,
        )  # fmt: skip
        self.model_loads = Counter(
            "gan_model_loads", "Model version loads, by result (success, failure).", ["model", "result"],
            registry=registry,
        )  # fmt: skip
        self.repository_errors = Counter(
            "gan_model_repository_errors", "Repository passes cut short by the object store or the download directory,"
            " by kind (unreachable, denied, no_bucket, changed, disk, error).", ["kind"], registry=registry,
        )  # fmt: skip
        self.model_load_seconds = Histogram(
            "gan_model_load_seconds", "Time to load, validate and warm a model version.", ["model"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0), registry=registry,
        )  # fmt: skip

    def cache_hooks(self) -> tuple[Callable[[bool], None], Callable[[int], None]]:
        """The response cache's hooks: count a lookup, set the bytes held."""
        hit, miss = self.cache_lookups.labels("hit"), self.cache_lookups.labels("miss")
        return (lambda found: (hit if found else miss).inc()), self.cache_bytes.set

    def version_left(self, model: str, version: int, provider: str) -> None:
        """A version stopped serving: its gan_model_info series goes (is 0 under --workers, where a series that
        several processes write cannot be removed)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.model_info.labels(model, str(version), provider).set(0)
            return
        with contextlib.suppress(KeyError):
            self.model_info.remove(model, str(version), provider)

    def observer(self, model: str, version: int) -> BatchObserverImpl:
        return BatchObserverImpl(self, model, str(version))


class BatchObserverImpl:
    """The batcher's hooks, bound to one model version's label values."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        self._wait = metrics.queue_wait_seconds.labels(model, version)
        self._run = metrics.run_seconds.labels(model, version)
        self._size = metrics.batch_size.labels(model, version)
        self._depth = metrics.queue_depth.labels(model, version)
        self._images = metrics.images.labels(model)

    def queue_wait(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def batch(self, size: int, run_seconds: float) -> None:
        self._size.observe(size)
        self._run.observe(run_seconds)
        self._images.inc(size)  # every sample ONNX Runtime ran is an image generated

    def depth(self, samples: int) -> None:
        self._depth.set(samples)
