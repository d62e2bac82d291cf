"""The composition root: Server(cfg) wires registry, batchers, data plane, metrics, health, reflection, servicer.

Every RPC of every registered service passes through one interceptor (service/interceptor.py), which maps domain
errors to status codes and records the request metrics.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, start_http_server

from service import http
from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.api.inference import grpc_predict_v2_pb2 as oip_pb
from service.api.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from service.config import ServerConfig
from service.dataplane import DataPlane
from service.interceptor import Interceptor
from service.metrics import Metrics
from service.oip import InferenceServicer
from service.registry import Registry
from service.security import Authorizer, http_ssl_context, server_credentials
from service.servicer import GeneratorServicer, ModelAdminServicer

log = logging.getLogger(__name__)

MAX_METADATA_BYTES = 16 << 10
DRAIN_QUIET_S = 0.5  # a drain ends once no call arrived for this long (or at the grace period's end)

GENERATOR = pb.DESCRIPTOR.services_by_name["Generator"]
ADMIN = pb.DESCRIPTOR.services_by_name["ModelAdmin"]
OIP = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
SERVICE_NAME = GENERATOR.full_name
# The role each service needs when tokens are on (None: open to all). Health stays open for kubelet probes, which
# cannot send tokens; a service not named here needs admin.
ROLES = {
    GENERATOR.full_name: "infer", OIP.full_name: "infer", ADMIN.full_name: "admin", HEALTH.full_name: None,
    REFLECTION.full_name: "infer",
    "grpc.reflection.v1.ServerReflection": "infer",  # in case grpcio-reflection also registers v1
}  # fmt: skip


def server_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """gRPC channel arguments for the server: message limits, and connection ageing when it is on."""
    life = cfg.lifecycle
    options = [
        ("grpc.max_send_message_length", cfg.limits.max_message_bytes),
        ("grpc.max_receive_message_length", cfg.limits.max_message_bytes),
        # Headers past this are refused by gRPC itself, before any handler or the audit log sees the call.
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ]
    if life.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", max(1, round(life.max_connection_age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", round(life.max_connection_age_grace_s * 1000)),
        ]
    return options


def is_loopback(host: str) -> bool:
    """Whether `host` (as given to --host) binds the loopback interface only."""
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def metrics_endpoint(port: int, host: str, registry: CollectorRegistry):
    """Prometheus's HTTP server on the gRPC host ("[::]" → "::"; all IPv4 interfaces where IPv6 is off)."""
    addr = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return start_http_server(port, addr=addr, registry=registry)[0]
    except OSError:
        if addr != "::":
            raise
        return start_http_server(port, addr="0.0.0.0", registry=registry)[0]


class Server:
    def __init__(self, cfg: ServerConfig, metrics_registry: CollectorRegistry | None = None):
        self.cfg = cfg
        sec = cfg.security
        self.metrics = Metrics(metrics_registry or CollectorRegistry())
        failed = self.metrics.credential_reload_failures.labels
        self._tls_failed = failed("tls").inc
        # Before anything else is built: a certificate, key or tokens file that cannot be used stops the start.
        self.credentials = self.authorizer = None
        if sec.tls_cert:
            self.credentials = server_credentials(sec.tls_cert, sec.tls_key, sec.tls_client_ca, failed("tls").inc)
        if sec.auth_tokens_file:
            self.authorizer = Authorizer(sec.auth_tokens_file, ROLES, on_reload_failure=failed("tokens").inc)
        self.registry = Registry(
            Path(cfg.model_repository), cfg.models, cfg.runtime, cfg.batching, self.metrics, self._registry_changed,
            cfg.lifecycle.grace_seconds,
        )  # fmt: skip
        self.encoder = ThreadPoolExecutor(cfg.limits.encoder_threads, thread_name_prefix="encode")
        self.plane = DataPlane(self.registry, cfg.limits, self.encoder, cfg.security.full_metadata)
        self.health = health.aio.HealthServicer()
        # Every service, registered and listed for reflection from this one table.
        services = [
            (GENERATOR, pb_grpc.add_GeneratorServicer_to_server, GeneratorServicer(self.plane)),
            (OIP, oip_grpc.add_GRPCInferenceServiceServicer_to_server, InferenceServicer(self.plane)),
            (HEALTH, health_pb2_grpc.add_HealthServicer_to_server, self.health),
        ]
        admin = sec.admin_api == "on" or (sec.admin_api == "auto" and (self.authorizer or is_loopback(cfg.host)))
        if admin:
            services.insert(1, (ADMIN, pb_grpc.add_ModelAdminServicer_to_server, ModelAdminServicer(self.registry)))
        else:
            log.info("ganserve.v1.ModelAdmin is off: no tokens, and %s is not loopback (--admin-api on)", cfg.host)
        # Health, so that probes read NOT_SERVING, and reflection, whose streams tools hold open, neither count nor
        # are refused during a drain.
        open_streams = frozenset([HEALTH.full_name, REFLECTION.full_name, "grpc.reflection.v1.ServerReflection"])
        self.interceptor = Interceptor(
            self.metrics, lambda name: name in self.registry.models, self.authorizer, open_streams
        )
        self.grpc = grpc.aio.server(options=server_options(cfg), interceptors=[self.interceptor])
        for _, add, servicer in services:
            add(servicer, self.grpc)
        self.services = [d for d, *_ in services] + ([REFLECTION] if sec.reflection else [])
        if sec.reflection:
            reflection.enable_server_reflection([d.full_name for d in self.services], self.grpc)
        self._health_only = None  # the plaintext health port's server, when there is one
        self.port = 0
        self.http_port = 0
        self._web = None  # the HTTP front end's runner, when it serves
        self.metrics_port = 0
        self.health_port = 0
        self._http = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._background: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None

    def spawn(self, coro: Coroutine, what: str) -> asyncio.Task:
        """Run `coro` in the background, held until it ends; a failure is logged, never lost."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)

        def done(t: asyncio.Task) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed", what, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def start(self) -> None:
        await self._set_health(False)
        cfg, sec = self.cfg, self.cfg.security
        address = f"{cfg.host}:{cfg.port}"
        if self.credentials is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, self.credentials)
        if cfg.health_port >= 0:
            self._health_only = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_only)
            self.health_port = self._health_only.add_insecure_port(f"{cfg.host}:{cfg.health_port}")
            await self._health_only.start()
        if cfg.metrics_port >= 0:
            self._http = metrics_endpoint(cfg.metrics_port, cfg.metrics_host or cfg.host, self.metrics.registry)
            self.metrics_port = self._http.server_port
        await self.grpc.start()
        if cfg.http_port >= 0:
            front = http.Front(self.plane, self.interceptor, self.authorizer, cfg.limits.max_message_bytes)
            tls = None
            if sec.tls_cert:
                tls = http_ssl_context(sec.tls_cert, sec.tls_key, sec.tls_client_ca, self._tls_failed)
            self._web, self.http_port = await http.start(front, cfg.host, cfg.http_port, tls)
        if self.credentials is None and not is_loopback(cfg.host):
            if self.authorizer is None:
                log.warning(
                    "serving plaintext gRPC without tokens on %s: anyone who reaches port %d may call it"
                    " (see README, Security: --tls-cert/--tls-key, --tls-client-ca, --auth-tokens-file)",
                    cfg.host, self.port,
                )  # fmt: skip
            else:
                log.warning("bearer tokens over plaintext gRPC on %s: anyone on the path can read them", cfg.host)
        loaded = await self.registry.sync()
        await self._set_health(self.registry.ready)
        if cfg.models.mode == "poll":
            self._poller = self.spawn(self._poll(cfg.models.poll_seconds), "repository poll")
        log.info(
            "serving %d model version(s): gRPC on port %d, HTTP on %d, metrics on %d", loaded, self.port,
            self.http_port, self.metrics_port,
        )  # fmt: skip

    async def reload(self) -> int:
        """SIGHUP: re-read the tokens file and rescan the repository; returns how many versions joined."""
        if self._stopping:
            return 0
        if self.authorizer is not None:
            self.authorizer.reload()
        return await self.registry.sync()

    async def _poll(self, seconds: float) -> None:
        while not self._stopping:
            await asyncio.sleep(seconds)
            try:
                await self.registry.sync()
            except Exception:  # one bad pass must not end polling
                log.exception("repository poll failed")

    def _registry_changed(self) -> None:
        """After every lifecycle pass: NOT_SERVING only while no version of any model is ready."""
        if not self._stopping:
            self.spawn(self._refresh_health(), "health update")

    async def _refresh_health(self) -> None:
        if not self._stopping:  # looked at when it runs: a stop may have begun since it was spawned
            await self._set_health(self.registry.ready)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING first, then finish accepted requests within the grace period, then stop."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.cfg.lifecycle.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        try:
            if self._poller is not None:
                self._poller.cancel()
            await self.health.enter_graceful_shutdown()  # NOT_SERVING, and later updates are ignored
            # New calls get UNAVAILABLE from here on, while the accepted ones finish; then gRPC itself stops. After a
            # clean drain only health Watch streams are left, and they need not hold the stop for the whole grace.
            drained = await self.interceptor.drain(grace, quiet=min(DRAIN_QUIET_S, grace / 4))
            left = max(0.0, deadline - time.monotonic())
            await self.grpc.stop(min(left, DRAIN_QUIET_S) if drained else left)
            if self._web is not None:
                await self._web.cleanup()
            await self.registry.stop()
        finally:
            if self._health_only is not None:
                await self._health_only.stop(None)
            self.encoder.shutdown(wait=False)
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
            self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(cfg: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain. SIGHUP rescans the model repository (and the tokens file)."""
    server = Server(cfg)
    await server.start()
    # One machine-readable line on stdout: how scripts and tests learn the ports (0 in the config picks free ones).
    ready = {"event": "serving", "port": server.port, "http_port": server.http_port}
    ready |= {"metrics_port": server.metrics_port}
    ready |= {"health_port": server.health_port} if cfg.health_port >= 0 else {}
    print(json.dumps(ready | {"models": sum(map(len, server.registry.models.values()))}), flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: server.spawn(_shutdown(server, s), f"{s.name} shutdown"))
    loop.add_signal_handler(signal.SIGHUP, lambda: server.spawn(server.reload(), "SIGHUP reload"))
    await server.wait()


async def _shutdown(server: Server, sig: signal.Signals) -> None:
    log.info("%s: draining for up to %.0f s", sig.name, server.cfg.lifecycle.grace_seconds)
    await server.stop()
