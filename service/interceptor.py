"""One server interceptor owns what every RPC shares: domain errors → status codes, and request metrics.

It wraps each method handler the server resolves, of every registered service, unary or streaming, including
methods added later; nothing lists the RPCs by hand. Anything unexpected becomes INTERNAL with a generic message,
and its traceback goes to the log, never to the client. With tokens on, it also authorizes every call
(service/security.py) before the request is parsed; a refusal is counted, audited in the log and aborted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc

from service import errors
from service.metrics import UNKNOWN_MODEL, Metrics
from service.security import Authorizer, Refusal

log = logging.getLogger(__name__)

STATUS = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,  # what generated servicer stubs raise for a missing method
}
CODES = {code.value[0]: code for code in grpc.StatusCode}
CALL: contextvars.ContextVar[grpc.aio.ServicerContext | None] = contextvars.ContextVar("call", default=None)


class LateReplyFilter(logging.Filter):
    """Drops gRPC's traceback for a reply that lost the race with its own call's deadline.

    gRPC logs "ExecuteBatchError raised in core" when core cancels a call at its deadline while the reply's send is
    under way; the client already has DEADLINE_EXCEEDED, and nothing was lost. The log comes from the call's own
    task, so CALL tells whose deadline it was. Every other such error (a reply over the message limit) still logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("ExecuteBatchError raised in core"):
            return True
        context = CALL.get()
        left = context.time_remaining() if context is not None else None
        return left is None or left > 0


LATE_REPLIES = LateReplyFilter()


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls], str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


def cancelled(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why gRPC cancelled a handler: its deadline ran out, or the client went away."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


def code_set(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code a handler set itself (health's NOT_FOUND, an abort), OK when it set none."""
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    return code if isinstance(code, grpc.StatusCode) else CODES.get(code, grpc.StatusCode.UNKNOWN)


class Malformed:
    """What a request body that does not parse becomes, so that the call can answer INVALID_ARGUMENT itself."""

    def __init__(self, message: str):
        self.message = message


def lenient(deserialize: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    """`deserialize`, returning Malformed instead of raising: gRPC would answer UNKNOWN and log a traceback."""
    if deserialize is None:
        return None
    cls = getattr(deserialize, "__self__", None)  # Message.FromString
    kind = getattr(getattr(cls, "DESCRIPTOR", None), "full_name", "request message")

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # DecodeError, or anything a parser raises on bytes it was never meant to see
            return Malformed(f"request: the body is not a valid {kind}")

    return parse


class Interceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call by method, model and code; maps domain errors to status codes.

    While draining (`drain()`), it answers new calls itself with UNAVAILABLE, except to the services in `open_`
    (health, so that probes read NOT_SERVING), and counts the calls still running down to zero.
    """

    def __init__(
        self,
        metrics: Metrics,
        is_model: Callable[[str], bool],
        authorizer: Authorizer | None = None,
        open_during_drain: frozenset[str] = frozenset(),
    ):
        self.metrics, self.is_model, self.authorizer = metrics, is_model, authorizer
        self.open_during_drain = open_during_drain
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self._children: dict[tuple[str, str, grpc.StatusCode], tuple] = {}  # labels() per call costs more
        self.active = 0  # calls inside a handler, of the services not open during a drain
        self.last_arrival = 0.0  # time.monotonic() of the last such call
        self._idle: asyncio.Event | None = None
        self.draining = False
        grpc_log = logging.getLogger("grpc._cython.cygrpc")
        if LATE_REPLIES not in grpc_log.filters:
            grpc_log.addFilter(LATE_REPLIES)

    async def drain(self, timeout: float, quiet: float) -> bool:
        """Refuse new calls from now on, and wait up to `timeout` s until none runs and none arrived for `quiet` s.

        The quiet spell matters: gRPC's own shutdown cancels calls it has received and not handed out yet, so the
        drain lasts until clients have moved on. True if it ended so, False if the time ran out.
        """
        self.draining = True
        start = time.monotonic()
        end = start + timeout
        while (now := time.monotonic()) < end:
            if self.active:
                self._idle = asyncio.Event()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), end - now)
                continue
            idle = now - max(self.last_arrival, start)
            if idle >= quiet:
                return True
            await asyncio.sleep(min(quiet - idle, end - now))
        return not self.active

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        counted = _service(details.method) not in self.open_during_drain
        if counted and self.draining:  # a clear, retryable answer rather than gRPC's own CANCELLED
            return self._answer(details.method, handler, grpc.StatusCode.UNAVAILABLE, "server: shutting down")
        if self.authorizer is not None:
            # Before the handler is even looked at: an unknown method needs admin too, so that nobody without a
            # token can map the API by the difference between UNIMPLEMENTED and UNAUTHENTICATED.
            refusal = self.authorizer.check(details.method, details.invocation_metadata)
            if refusal is not None:
                return self._refuse(details.method, handler, refusal)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED itself
            return None
        if counted:  # after the token check: a caller without one cannot keep a drain from ending
            self.last_arrival = time.monotonic()
        cached = self._handlers.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(details.method, handler))
            self._handlers[details.method] = cached
        return cached[1]

    def _wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse, send = lenient(handler.request_deserializer), handler.response_serializer
        method, counted = path.rsplit("/", 1)[-1], _service(path) not in self.open_during_drain
        guard = functools.partial(self._guard, method, request_streaming=handler.request_streaming, counted=counted)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary), parse, send)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream), parse, send)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary), parse, send)
        return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream), parse, send)

    def _refuse(self, path: str, handler: grpc.RpcMethodHandler | None, refusal: Refusal) -> grpc.RpcMethodHandler:
        """A handler that records, audits and aborts a call refused for its credentials."""

        def audit(context: grpc.aio.ServicerContext) -> None:
            self.metrics.auth_failures.labels(refusal.reason).inc()
            log.warning(
                "refused %s from %s: %s (token %s)", path, context.peer(), refusal.reason, refusal.token or "-"
            )  # the audit line: never the token itself

        return self._answer(path, handler, refusal.code, refusal.message, audit)

    def _answer(
        self, path: str, handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str,
        note: Callable[[grpc.aio.ServicerContext], None] = lambda context: None,
    ) -> grpc.RpcMethodHandler:  # fmt: skip
        """A handler that records the call and ends it with `code`, decided on the metadata alone.

        It takes a request *stream* whatever the method's kind, and never reads it: gRPC reads a unary request
        whole before calling its handler, which would let anyone without a token upload a full-size message.
        """
        method = path.rsplit("/", 1)[-1]

        async def answer(request, context):
            start = time.perf_counter()
            note(context)
            self.record(method, UNKNOWN_MODEL, code, start)
            await context.abort(code, message)

        async def answer_stream(request, context):
            await answer(request, context)
            yield  # never reached: answer() aborts; the yield makes this a streaming handler

        if handler is not None and not handler.response_streaming:
            return grpc.stream_unary_rpc_method_handler(answer, None, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(answer_stream, None, handler and handler.response_serializer)

    def _guard(self, method: str, behavior, request_streaming: bool, counted: bool):
        """The same behaviour inside `outcome`, of the same kind: gRPC tells streams by their function type."""
        outcome = functools.partial(self._outcome, counted=counted)
        if request_streaming and (inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior)):
            behavior = _checking_requests(behavior)
        if inspect.isasyncgenfunction(behavior):

            async def stream(request, context):
                # aclosing: a call that ends early closes the handler's generator now, not when it is collected.
                async with outcome(method, request, context), contextlib.aclosing(behavior(request, context)) as it:
                    async for response in it:
                        yield response

            return stream
        if inspect.iscoroutinefunction(behavior):

            async def unary(request, context):
                async with outcome(method, request, context):
                    return await behavior(request, context)

            return unary
        if inspect.isgeneratorfunction(behavior):

            async def sync_stream(request, context):
                async with outcome(method, request, context):
                    for response in behavior(request, context):
                        yield response

            return sync_stream

        async def sync_unary(request, context):
            async with outcome(method, request, context):  # a plain function: off the event loop
                return await asyncio.get_running_loop().run_in_executor(None, behavior, request, context)

        return sync_unary

    @contextlib.asynccontextmanager
    async def _outcome(self, method: str, request, context, counted: bool) -> AsyncIterator[None]:
        start = time.perf_counter()
        CALL.set(context)
        name = getattr(request, "model", None) or getattr(request, "name", None) or getattr(request, "model_name", "")
        model = name if isinstance(name, str) and self.is_model(name) else UNKNOWN_MODEL
        code = None
        self.active += counted
        try:
            if isinstance(request, Malformed):
                raise errors.InvalidArgument(request.message)
            yield
            code = code_set(context)
        except (asyncio.CancelledError, GeneratorExit):  # the client left, the deadline passed, or the server stops
            code = cancelled(context)
            raise
        except grpc.aio.AbortError:  # the handler aborted itself: the status is already set
            code = code_set(context)
            raise
        except Exception as exc:
            code, message = status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method, exc_info=exc)
            await context.abort(code, message)
        finally:
            self._leave(counted)
            self.record(method, model, code or grpc.StatusCode.UNKNOWN, start)

    def _leave(self, counted: bool) -> None:
        self.active -= counted
        if not self.active and self._idle is not None:
            self._idle.set()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """A call of another front end (HTTP), counted like an RPC for the drain."""
        self.last_arrival = time.monotonic()
        self.active += 1
        try:
            yield
        finally:
            self._leave(True)

    def record(self, method: str, model: str, code: grpc.StatusCode, start: float) -> None:
        """Count and time one call (`start`: time.perf_counter() when it arrived)."""
        key = (method, model, code)
        children = self._children.get(key)
        if children is None:
            m = self.metrics
            children = m.requests.labels(method, model, code.name), m.request_seconds.labels(method, model)
            self._children[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - start)


def _checking_requests(behavior):
    """A request-streaming behaviour whose stream raises InvalidArgument at a message that did not parse."""

    async def checked(requests):
        async for request in requests:
            if isinstance(request, Malformed):
                raise errors.InvalidArgument(request.message)
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def stream(requests, context):
            async with contextlib.aclosing(behavior(checked(requests), context)) as it:
                async for response in it:
                    yield response

        return stream

    async def unary(requests, context):
        return await behavior(checked(requests), context)

    return unary


def _service(path: str) -> str:
    """ "/pkg.Service/Method" → "pkg.Service" ("" for a path of another shape)."""
    parts = path.split("/")
    return parts[1] if len(parts) == 3 else ""
