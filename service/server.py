"""The composition root: Server(cfg) wires registry, batchers, data plane, metrics, health, reflection, servicer.

Every call, of every gRPC service and every HTTP route, passes through one gate (service/gate.py), which maps domain
errors to status codes and records the request metrics.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from service import http, profiles
from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.api.inference import grpc_predict_v2_pb2 as oip_pb
from service.api.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from service.cache import ResultCache
from service.config import RuntimeConfig, ServerConfig
from service.dataplane import DataPlane
from service.domain import VersionStatus
from service.frontends.admin import AdminOff, ModelAdminServicer
from service.frontends.ganserve import GeneratorServicer
from service.frontends.images import ImagesApi
from service.frontends.oip_grpc import InferenceServicer
from service.frontends.oip_rest import OipRest
from service.frontends.pages import Pages
from service.gate import Gate
from service.interceptor import Gated
from service.metrics import Metrics
from service.objectstore import S3Repository, StoreUnavailable
from service.registry import READY, Registry
from service.repository import LocalRepository, Repository, RepositoryError
from service.runtime import Session
from service.security import Authorizer, http_ssl_context, server_credentials
from service.tracing import Tracing, TracingError, configure

log = logging.getLogger(__name__)

MAX_METADATA_BYTES = 16 << 10
DRAIN_QUIET_S = 0.5  # a drain ends once no call arrived for this long (or at the grace period's end)
MAX_LISTED = 10  # what the no-model warning names at most

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


class StartupError(Exception):
    """The server cannot start as configured; the message names the flag and its value."""


def server_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """gRPC channel arguments for the server: message limits, port sharing, and connection ageing when it is on."""
    life = cfg.lifecycle
    options = [
        ("grpc.max_send_message_length", cfg.limits.max_message_bytes),
        ("grpc.max_receive_message_length", cfg.limits.max_message_bytes),
        # Headers past this are refused by gRPC itself, before any handler or the audit log sees the call.
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        # gRPC's default (1) lets a second server bind a taken port and silently take half its connections.
        ("grpc.so_reuseport", int(cfg.reuse_grpc_port)),
    ]
    if life.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", max(1, round(life.max_connection_age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", round(life.max_connection_age_grace_s * 1000)),
        ]
    return options


def group_registry(directory: str) -> CollectorRegistry:
    """The series every process of a --workers group wrote to `directory` (prometheus_client's multiprocess mode)."""
    group = CollectorRegistry()
    multiprocess.MultiProcessCollector(group, path=directory)
    return group


def exposed_registry(own: CollectorRegistry) -> CollectorRegistry:
    """What /metrics shows: this process's series, or under --workers (set up by the parent) the whole group's, so
    that any worker's answer covers every worker."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return group_registry(directory) if directory else own


def bare(host: str) -> str:
    """A --host as sockets take it: "[::1]" → "::1"."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    """Whether `host` (as given to --host) binds the loopback interface only."""
    host = bare(host)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def metrics_endpoint(port: int, host: str, registry: CollectorRegistry):
    """Prometheus's HTTP server on the gRPC host ("[::]" → "::"; all IPv4 interfaces where IPv6 is off)."""
    addr = bare(host)
    try:
        return start_http_server(port, addr=addr, registry=registry)[0]
    except OSError as e:
        if addr != "::" or e.errno == errno.EADDRINUSE:
            raise
        return start_http_server(port, addr="0.0.0.0", registry=registry)[0]


def bind_error(flag: str, port: int, e: OSError) -> StartupError:
    """`--flag PORT: address already in use`, from the error a bind raised."""
    why = os.strerror(e.errno) if e.errno and e.errno > 0 else str(e)
    return StartupError(f"--{flag.replace('_', '-')} {port}: {why.lower()}")


def check_free(flag: str, host: str, port: int) -> None:
    """StartupError when host:port cannot be bound. Asked before gRPC binds it: gRPC logs its own failure at ERROR
    and raises a RuntimeError that does not say why, where this names the flag and the reason in one line."""
    if port <= 0:
        return
    addr = bare(host)
    try:
        addresses = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # an address that does not resolve: gRPC's own bind reports it
    for family, kind, proto, _, sockaddr in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue  # no IPv6 here: gRPC falls back to IPv4
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: a port in TIME_WAIT is free
            try:
                probe.bind(sockaddr)
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise bind_error(flag, port, e) from None


def listen(server: grpc.aio.Server, flag: str, cfg: ServerConfig, port: int, credentials=None) -> int:
    """Bind a gRPC server to cfg.host:port; returns the port bound, or raises StartupError naming `flag`."""
    if not cfg.reuse_grpc_port:
        check_free(flag, cfg.host, port)
    address = f"{cfg.host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC raises where it cannot bind (older versions returned 0)
        bound = 0
    if not bound:
        raise StartupError(f"--{flag.replace('_', '-')} {port}: cannot listen on {address} (gRPC's log says why)")
    return bound


def open_repository(cfg: ServerConfig) -> Repository:
    """--model-repository as a Repository: s3://BUCKET/PREFIX, or a local directory. StartupError naming the flag."""
    try:
        if not cfg.model_repository.startswith("s3://"):
            return LocalRepository(cfg.model_repository)
        store = cfg.store
        cache = profiles.directory(store.model_cache)
        downloads = cache / "models" if store.model_cache == "auto" else cache
        return S3Repository(cfg.model_repository, downloads, store.max_model_bytes, store.s3_endpoint, store.s3_region)
    except RepositoryError as e:
        raise StartupError(f"--model-repository {e}") from None


def nothing_served(repository: Repository, status: list[VersionStatus]) -> str:
    """The start-up warning for a repository that exists and serves nothing, naming what was skipped and why."""
    try:
        models, skipped = repository.scan()
    except StoreUnavailable as e:
        return f"model repository {e}: nothing loaded yet"
    found = [f"{name[:64]!r} ({why.partition(' (')[0]})" for name, why in skipped.items()]
    found += [f"{name} (no <version>/model.onnx)" for name, m in models.items() if m.readable and not m.files]
    found += [m.error for m in models.values() if not m.readable]
    found += [f"{s.name}/{s.version} ({s.state.lower()}: {s.reason[:120]})" for s in status if s.state != READY]
    listed = ", ".join(found[:MAX_LISTED]) + (f" and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else "")
    return f"model repository {repository}: no loadable model ({f'skipped: {listed}' if found else 'it is empty'})"


class Server:
    def __init__(
        self, cfg: ServerConfig, metrics_registry: CollectorRegistry | None = None,
        session_factory: Callable[[Path, RuntimeConfig], Session] = Session, tracing: Tracing | None = None,
    ):  # fmt: skip
        """`session_factory` opens a model file (tests inject gated fakes; see the registry). `tracing`: where spans
        go (service/tracing.py; serve() builds it from OTEL_*), None for none; the server shuts it down at stop."""
        self.cfg = cfg
        self.tracing = tracing
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
            open_repository(cfg), cfg.models, cfg.runtime, cfg.batching, self.metrics, self._registry_changed,
            cfg.lifecycle.grace_seconds, session_factory,
        )  # fmt: skip
        self.encoder = ThreadPoolExecutor(cfg.limits.encoder_threads, thread_name_prefix="encode")
        cache = None
        if cfg.limits.response_cache_bytes:
            cache = ResultCache(cfg.limits.response_cache_bytes, *self.metrics.cache_hooks())
        self.plane = DataPlane(self.registry, cfg.limits, self.encoder, cfg.security.full_metadata, cache, tracing)
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
        else:  # still answered: a call says why it is off
            why = ("--admin-api off" if sec.admin_api == "off" else
                   f"no tokens, and --host {cfg.host} is not loopback (serve on 127.0.0.1, add --auth-tokens-file,"
                   " or --admin-api on)")  # fmt: skip
            services.insert(1, (ADMIN, pb_grpc.add_ModelAdminServicer_to_server, AdminOff(why)))
            log.info("ganserve.v1.ModelAdmin is off: %s", why)
        # Health, so that probes read NOT_SERVING, and reflection, whose streams tools hold open, neither count nor
        # are refused during a drain.
        open_streams = frozenset([HEALTH.full_name, REFLECTION.full_name, "grpc.reflection.v1.ServerReflection"])
        self.gate = Gate(self.metrics, lambda name: name in self.registry.models, self.authorizer, tracing)
        gated = Gated(self.gate, open_streams)
        for _, add, servicer in services:
            add(servicer, gated)
        self.services = [d for d, *_ in services] + ([REFLECTION] if sec.reflection else [])
        if self.authorizer is not None:  # a method not served needs admin: an infer token learns nothing from it
            self.authorizer.known_methods = frozenset(
                f"/{d.full_name}/{m.name}" for d in self.services for m in d.methods
            )
        if sec.reflection:  # registered as enable_server_reflection would on an aio server
            servicer = reflection.aio.ReflectionServicer([d.full_name for d in self.services])
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, gated)
        self.grpc = grpc.aio.server(handlers=[gated], options=server_options(cfg))
        self._health_only = None  # the plaintext health port's server, when there is one
        self.port = 0
        self.http_port = 0
        self._web = None  # the HTTP front end's runner, when it serves
        self.metrics_port = 0
        self.health_port = 0
        self._metrics_server = None  # Prometheus's own HTTP server, on --metrics-port
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
        """Open the ports and load the models. StartupError, naming the flag, when the model repository or a port
        cannot be used; the repository is checked before any port opens, and ports already open are closed again."""
        cfg = self.cfg
        try:
            await asyncio.to_thread(self.registry.repository.check)
        except RepositoryError as e:
            raise StartupError(f"--model-repository {e}") from None
        except StoreUnavailable as e:  # it may come back: serve (not ready) meanwhile, and keep trying
            log.warning("model repository %s; starting anyway, and retrying", e)
        await self._set_health(False)
        try:
            await self._open()
        except Exception:
            await self.stop(0)
            raise
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
        if not self.registry.ready:  # it serves on (NOT_SERVING) for a model to arrive, but should say why
            warning = await asyncio.to_thread(nothing_served, self.registry.repository, self.registry.status())
            log.warning("%s", warning)
        await self._set_health(self.registry.ready)
        if cfg.models.mode == "poll":
            self._poller = self.spawn(self._poll(cfg.models.poll_seconds), "repository poll")
        log.info(
            "serving %d model version(s): gRPC on port %d, HTTP on %d, metrics on %d", loaded, self.port,
            self.http_port, self.metrics_port,
        )  # fmt: skip

    async def _open(self) -> None:
        """Bind and start every port: gRPC, the health-only port, metrics and HTTP."""
        cfg, sec = self.cfg, self.cfg.security
        self.port = listen(self.grpc, "port", cfg, cfg.port, self.credentials)
        await self.grpc.start()  # at once: a gRPC server that never started keeps its port, even after stop()
        if cfg.health_port >= 0:
            self._health_only = grpc.aio.server(options=[("grpc.so_reuseport", int(cfg.reuse_grpc_port))])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_only)
            self.health_port = listen(self._health_only, "health_port", cfg, cfg.health_port)
            await self._health_only.start()
        if cfg.metrics_port >= 0:
            try:
                self._metrics_server = metrics_endpoint(
                    cfg.metrics_port, cfg.metrics_host or cfg.host, self.metrics.registry
                )
            except OSError as e:
                raise bind_error("metrics_port", cfg.metrics_port, e) from None
            self.metrics_port = self._metrics_server.server_port
        if cfg.http_port >= 0:
            limits = cfg.limits
            rest = OipRest(self.plane, limits.max_message_bytes, limits.max_json_bytes, self.encoder,
                           lambda: self.gate.draining)  # fmt: skip
            routes = rest.routes() + Pages(self.plane, exposed_registry(self.metrics.registry)).routes()
            routes += ImagesApi(self.plane, limits.max_json_bytes).routes()
            if self.authorizer is not None:  # the gate checks an HTTP route as /<its service>/<its method>
                paths = {f"/{r.service}/{r.method or r.name}" for r in routes if r.service}
                self.authorizer.known_methods |= paths
            front = http.Front(self.gate, routes, limits.max_message_bytes, limits.http_deadline_s)
            tls = None
            if sec.tls_cert:
                tls = http_ssl_context(sec.tls_cert, sec.tls_key, sec.tls_client_ca, self._tls_failed)
            try:
                self._web, self.http_port = await http.start(
                    front, cfg.host, cfg.http_port, self.metrics, cfg.lifecycle.header_timeout_s, tls,
                    cfg.reuse_grpc_port,
                )  # fmt: skip
            except OSError as e:
                raise bind_error("http_port", cfg.http_port, e) from None

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
            drained = await self.gate.drain(grace, quiet=min(DRAIN_QUIET_S, grace / 4))
            left = max(0.0, deadline - time.monotonic())
            await self.grpc.stop(min(left, DRAIN_QUIET_S) if drained else left)
            if self._web is not None:
                await self._web.cleanup()
            await self.registry.stop()
        finally:
            if self._health_only is not None:
                await self._health_only.stop(None)
            self.encoder.shutdown(wait=False)
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            if self.tracing is not None:  # the spans still queued are exported before the process goes
                await asyncio.to_thread(self.tracing.shutdown)
            self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(cfg: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain. SIGHUP rescans the model repository (and the tokens file)."""
    try:
        tracing = configure(os.environ)  # None unless OTEL_* ask for it: see service/tracing.py
    except TracingError as e:
        raise StartupError(str(e)) from None
    server = Server(cfg, tracing=tracing)
    await server.start()
    # One machine-readable line on stdout: how scripts and tests learn the ports (0 in the config picks free ones).
    ready = {"event": "serving", "port": server.port, "http_port": server.http_port}
    ready |= {"metrics_port": server.metrics_port}
    ready |= {"health_port": server.health_port} if cfg.health_port >= 0 else {}
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: server.spawn(_shutdown(server, s), f"{s.name} shutdown"))
    loop.add_signal_handler(signal.SIGHUP, lambda: server.spawn(server.reload(), "SIGHUP reload"))
    # After the handlers: whoever reads this line may signal at once (the parent of --workers does).
    print(json.dumps(ready | {"models": sum(map(len, server.registry.models.values()))}), flush=True)
    await server.wait()


async def _shutdown(server: Server, sig: signal.Signals) -> None:
    log.info("%s: draining for up to %.0f s", sig.name, server.cfg.lifecycle.grace_seconds)
    await server.stop()
