"""The composition root: build(cfg) wires registry, batchers, metrics, health, reflection and the servicer.

Domain errors become gRPC status codes here and only here (see `guard`); anything unexpected becomes
INTERNAL with a generic message, and its traceback goes to the log, never to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from service import errors
from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.config import ServerConfig
from service.metrics import UNKNOWN_MODEL, Metrics
from service.registry import Registry
from service.sampling import Sampler
from service.servicer import GeneratorServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name
STATUS = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
RPCS = ("ListModels", "GetModel", "Generate", "GenerateStream", "Interpolate")


def cancelled(context) -> grpc.StatusCode:
    """Why gRPC cancelled a handler: its deadline ran out, or the client went away."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls], str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


def server_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """gRPC channel arguments for the server: message limits, and connection ageing when it is on."""
    options = [
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
    ]
    if cfg.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", max(1, round(cfg.max_connection_age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", round(cfg.max_connection_age_grace_s * 1000)),
        ]
    return options


class Server:
    def __init__(self, cfg: ServerConfig, metrics_registry: CollectorRegistry | None = None):
        self.cfg = cfg
        self.metrics = Metrics(metrics_registry or CollectorRegistry())
        self.registry = Registry(
            Path(cfg.model_repository),
            cfg.runtime(),
            cfg.batch(),
            observer=self.metrics.observer,
            on_load=lambda mv: self.metrics.model_info.labels(mv.name, str(mv.version), mv.session.provider).set(1),
            on_failure=lambda name, reason: self.metrics.load_failures.labels(name).inc(),
        )
        self.encoder = ThreadPoolExecutor(cfg.encoder_threads, thread_name_prefix="encode")
        self.sampler = Sampler(self.registry, cfg.limits(), self.encoder, cfg.max_message_bytes)
        self.servicer = GeneratorServicer(self.registry, self.sampler)
        for name in RPCS:
            setattr(self.servicer, name, self.guard(name, getattr(self.servicer, name)))
        self.health = health.aio.HealthServicer()
        self.grpc = grpc.aio.server(options=server_options(cfg))
        pb_grpc.add_GeneratorServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc,
        )
        self.port = 0
        self.metrics_port = 0
        self._http = None
        self._stopped = asyncio.Event()
        self._stopping = False

    def guard(self, method: str, fn):
        """Wrap one RPC: map domain errors to status codes, count and time it. The one place for both."""
        metrics = self.metrics

        def model_label(request) -> str:
            name = getattr(request, "model", "") or getattr(request, "name", "")
            return name if name in self.registry.models else UNKNOWN_MODEL

        children: dict[tuple[str, grpc.StatusCode], tuple] = {}  # labels() per call costs more than the update

        def record(model: str, code: grpc.StatusCode, start: float) -> None:
            key = (model, code)
            if key not in children:
                children[key] = (
                    metrics.requests.labels(method, model, code.name),
                    metrics.request_seconds.labels(method, model),
                )
            count, seconds = children[key]
            count.inc()
            seconds.observe(time.perf_counter() - start)

        @contextlib.asynccontextmanager
        async def outcome(request, context) -> AsyncIterator[None]:
            start, model = time.perf_counter(), model_label(request)
            try:
                yield
            except asyncio.CancelledError:
                record(model, cancelled(context), start)
                raise
            except Exception as exc:
                code, message = status_of(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method, exc_info=exc)
                record(model, code, start)
                await context.abort(code, message)
            else:
                record(model, grpc.StatusCode.OK, start)

        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def stream(request, context):
                async with outcome(request, context):
                    async for response in fn(request, context):
                        yield response

            return stream

        @functools.wraps(fn)
        async def unary(request, context):
            async with outcome(request, context):
                return await fn(request, context)

        return unary

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def start(self) -> None:
        await self._set_health(False)
        self.port = self.grpc.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        if self.cfg.metrics_port >= 0:
            self._http, _ = start_http_server(self.cfg.metrics_port, registry=self.metrics.registry)
            self.metrics_port = self._http.server_port
        await self.grpc.start()
        loaded = await self.registry.load_all()
        await self._set_health(self.registry.ready)
        log.info("serving %d model version(s) on port %d, metrics on %d", loaded, self.port, self.metrics_port)

    async def reload(self) -> int:
        """Load versions that appeared in the repository since start; the old ones keep serving meanwhile."""
        if self._stopping:
            return 0
        loaded = await self.registry.load_all()
        if not self._stopping:
            await self._set_health(self.registry.ready)
        return loaded

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING first, then finish accepted requests within the grace period, then stop."""
        if self._stopping:
            return
        self._stopping = True
        try:
            await self._set_health(False)
            await self.grpc.stop(self.cfg.grace_seconds if grace is None else grace)
            await self.registry.stop()
        finally:
            self.encoder.shutdown(wait=False)
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
            self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


def build(cfg: ServerConfig, metrics_registry: CollectorRegistry | None = None) -> Server:
    return Server(cfg, metrics_registry)


async def serve(cfg: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain. SIGHUP loads versions added to the repository since."""
    server = build(cfg)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: asyncio.ensure_future(_shutdown(server, s)))
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(server.reload()))
    await server.wait()


async def _shutdown(server: Server, sig: signal.Signals) -> None:
    log.info("%s: draining for up to %.0f s", sig.name, server.cfg.grace_seconds)
    await server.stop()
