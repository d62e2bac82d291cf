"""HTTP on one port, and the HTTP adapter of the call gate (service/gate.py). It runs in the gRPC server's process
and event loop, over the same data plane: no second copy of a model.

aiohttp serves it: its AppRunner and TCPSite start inside an event loop that is already running, take no signal
handlers of their own and shut down gracefully, which is what sharing one loop with grpc.aio needs.

The front ends (service/frontends/oip_rest.py, pages.py) bring their routes; one middleware puts every call through
the gate, as the interceptor does for gRPC: tokens, the drain, the deadline (the `X-Request-Timeout` header in
seconds, else the server's default), cancellation when the client goes away, request metrics (method label
`http.<route>`), errors as `{"error": ...}` bodies, and a Server-Timing header with the server's own time. This
module also holds what hostile input meets first: body limits, header timeouts and protocol garbage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from service.errors import Code, InvalidArgument, Status, TooLarge, short
from service.frontends import text
from service.gate import SWEEP, TIMER, Gate
from service.metrics import Metrics

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "X-Request-Timeout"  # seconds, a decimal number: the call's deadline
DEFAULT = "the server's default deadline"
SHUTDOWN_S = 1.0  # after the drain: what is left (idle or half-sent connections) gets this long, then is closed
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    """One HTTP route of a front end. `service`: the service whose role it needs when tokens are on; None: open to
    all and not counted for the drain (health probes). `method` labels its metrics (`http.<method>`). `traced`:
    its calls make spans when tracing is on (never those of a probe: service None)."""

    name: str
    verb: str
    path: str
    handler: Handler
    service: str | None
    method: str = ""
    traced: bool = True


def error(status: Status) -> web.Response:
    response = web.json_response({"error": status.message}, status=status.http)
    if status.code is Code.UNAUTHENTICATED:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def read_body(request: web.Request, limit: int, what: str = "") -> bytes | bytearray:
    """The request body, refused with 413 past `limit` bytes: by its Content-Length before any of it is read, else
    as it arrives (and as it inflates, for a compressed body). `what` says which limit, in the message."""
    over = f"over the {limit:,}-byte limit{what}"
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"request: the body is {request.content_length:,} bytes, {over}")
    body = bytearray()
    try:
        if request.content_length is not None and "Content-Encoding" not in request.headers:
            return await request.read()  # its length known and within the limit: one read, no loop
        async for chunk in request.content.iter_chunked(1 << 16):
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"request: the body is {over}")
    except (BadHttpMessage, RequestPayloadError) as e:  # it does not decode as its Content-Encoding says, or is cut
        encoding = request.headers.get("Content-Encoding")
        how = f"as Content-Encoding {short(encoding, 16)}" if encoding else "as sent"
        raise InvalidArgument(f"request: the body does not decode {how} ({type(e).__name__})") from None
    return body  # the body's one copy: views of it (tensor bytes) are taken from here on


class Front:
    """The HTTP application: the front ends' routes, one middleware around them."""

    def __init__(self, gate: Gate, routes: list[Route], max_body_bytes: int, default_deadline_s: float):
        self.gate = gate
        self.app = web.Application(middlewares=[self.middleware], client_max_size=max_body_bytes)
        self.routes = {route.name: route for route in routes}
        # Per route, what every call of it needs: its metrics label, the path its token is checked for, and its span
        # name when it is traced.
        self.labels = {
            r.name: (f"http.{r.method or r.name}", f"/{r.service}/{r.method or r.name}",
                     f"{r.verb} {r.path}" if r.traced and r.service is not None else None)
            for r in routes
        }  # fmt: skip
        self.default = (default_deadline_s, f"{DEFAULT} ({default_deadline_s:g} s)")
        for route in routes:
            self.app.router.add_route(route.verb, route.path, route.handler, name=route.name)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = self.routes.get(request.match_info.route.name or "")
        if route is None or (route.service is None and not route.method):  # aiohttp's 404/405, the page's files
            try:
                return await handler(request)
            except web.HTTPException as e:
                return error(Status(Code.NOT_FOUND if e.status == 404 else Code.INVALID_ARGUMENT, e.reason, e.status))
        method, path, span = self.labels[route.name]
        counted = route.service is not None
        if counted:
            tokens = self.gate.authorizer is not None
            headers = [("authorization", v) for v in request.headers.getall("Authorization", [])] if tokens else ()
            refusal = self.gate.admit(path, headers, counted)
            if refusal is not None:
                return error(self.gate.refuse(refusal, method, f"HTTP {request.method} {request.path}", request.remote))
        trace = None if span is None or self.gate.tracing is None else (span, request.headers)
        async with self.gate.run("http", method, request.match_info.get("model", ""), counted, trace) as call:
            # Either replaces by a request's own deadline (OIP's timeout parameter). The default, long and on every
            # call, is swept rather than timed.
            if TIMEOUT_HEADER in request.headers:
                seconds = text.number(request.headers[TIMEOUT_HEADER], TIMEOUT_HEADER)
                if seconds <= 0:
                    raise InvalidArgument(f"{TIMEOUT_HEADER}: seconds, a number > 0 (got {seconds:g})")
                call.limit(seconds, f"{TIMEOUT_HEADER} ({seconds:g} s)", TIMER, fallback=True)
            elif self.default[0] > 0:
                call.limit(*self.default, SWEEP, fallback=True)
            try:
                response = await handler(request)
            except web.HTTPException as e:  # aiohttp's own refusals keep their status
                code = Code.INTERNAL if e.status >= 500 else Code.INVALID_ARGUMENT
                response, call.code = error(Status(code, e.reason, e.status)), code
            if call.span is not None:
                self.gate.tracing.answered(call.span, response.status)
        if call.status is not None:
            response = error(call.status)
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - call.start) * 1e3:.2f}"
        return response


class ProtocolErrors(logging.Filter):
    """aiohttp's "Error handling request" for bytes that are not HTTP/1.1: one counted line, no traceback.

    A scanner sends such bytes by the thousand; a traceback each would bury the log. Other errors pass unchanged.
    """

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None and not isinstance(exc, HttpProcessingError):  # aiohttp wraps a body's decode error
            exc = exc.__cause__ or exc.__context__
        if exc is not None:
            self.metrics.protocol_errors.inc()
            record.msg, record.args = "%s: %s", (record.getMessage(), f"{type(exc).__name__}: {exc}"[:200])
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


async def start(
    front: Front,
    host: str,
    port: int,
    metrics: Metrics,
    header_timeout_s: float,
    ssl_context=None,
    reuse_port: bool = False,
) -> tuple[web.AppRunner, int]:
    """Serve `front` on host:port ("[::]": every interface, IPv4 and IPv6); returns the runner and the port.
    `reuse_port`: share the port with other processes (SO_REUSEPORT; --workers).

    A handler is cancelled when its client goes away, so that its queued work is dropped. A connection that has
    not sent a whole request's headers `header_timeout_s` after it opened, or after its last answer, is closed.
    """
    # A logger of this server's own, so that its filter counts into this server's metrics; it logs as its parent.
    logger = logging.Logger("service.http.server")
    logger.parent = logging.getLogger("service.http")
    logger.addFilter(ProtocolErrors(metrics))
    runner = web.AppRunner(
        front.app, access_log=None, handle_signals=False, handler_cancellation=True, logger=logger,
        keepalive_timeout=header_timeout_s, shutdown_timeout=SHUTDOWN_S,
    )  # fmt: skip
    await runner.setup()
    bind = None if host in ("[::]", "::", "") else host.strip("[]")
    site = web.TCPSite(runner, bind, port, ssl_context=ssl_context, reuse_address=True, reuse_port=reuse_port or None)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]
