"""The gRPC adapter of the call gate (service/gate.py): one generic handler in front of every method of every service.

It wraps each method handler of every service registered with it, unary or streaming, including methods added
later; nothing lists the RPCs by hand. The gate decides admission (the drain, tokens) on the call's
metadata before the request is parsed, and runs the handler; this module only translates: method paths and
metadata in, the gate's Status out as a gRPC status, a body that does not parse as INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from service import errors
from service.errors import Code
from service.gate import WIRE, Gate
from service.security import Refusal

log = logging.getLogger(__name__)

# The gate's codes as gRPC's, and back: the same names.
GRPC = {code: grpc.StatusCode[code.name] for code in Code}
BY_NUMBER = {code.value[0]: Code[code.name] for code in grpc.StatusCode}
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


def cancelled(context: grpc.aio.ServicerContext) -> Code:
    """Why gRPC cancelled a handler: its deadline ran out, or the client went away."""
    remaining = context.time_remaining()
    return Code.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else Code.CANCELLED


def code_set(context: grpc.aio.ServicerContext) -> Code:
    """The code a handler set itself (health's NOT_FOUND, an abort), OK when it set none."""
    code = context.code()
    if code is None:
        return Code.OK
    if isinstance(code, grpc.StatusCode):
        return Code[code.name]
    return BY_NUMBER.get(code, Code.UNKNOWN)


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


class Gated(grpc.GenericRpcHandler):
    """Every service's handlers behind the gate: services register with this object (it takes what
    `add_*Servicer_to_server` gives a server), and the server is given this one generic handler.

    Not a grpc.aio.ServerInterceptor: gRPC runs an interceptor chain as a coroutine per call, and a generic handler is
    a plain call; the method lookup is one dict read. Calls to the services in `open_during_drain` (health, so that
    probes read NOT_SERVING) neither count for the drain nor are refused by it.
    """

    def __init__(self, gate: Gate, open_during_drain: frozenset[str] = frozenset()):
        self.gate, self.open_during_drain = gate, open_during_drain
        self._methods: dict[str, grpc.RpcMethodHandler] = {}  # "/pkg.Service/Method" → the service's own handler
        self._generic: list[grpc.GenericRpcHandler] = []  # services registered without a method table
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        grpc_log = logging.getLogger("grpc._cython.cygrpc")
        if LATE_REPLIES not in grpc_log.filters:
            grpc_log.addFilter(LATE_REPLIES)

    # What generated `add_*Servicer_to_server` functions call on a server.
    def add_generic_rpc_handlers(self, handlers) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._methods.update({f"/{service}/{method}": handler for method, handler in handlers.items()})

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path = details.method
        handler = self._methods.get(path) or self._find(details)
        counted = _service(path) not in self.open_during_drain
        # Before the handler is even looked at: an unknown method needs a token too, so that nobody without one can
        # map the API by the difference between UNIMPLEMENTED and UNAUTHENTICATED.
        refusal = self.gate.admit(path, details.invocation_metadata, counted)
        if refusal is not None:
            return self._refuse(path, handler, refusal)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED itself
            return None
        cached = self._wrapped.get(path)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(path, handler))
            self._wrapped[path] = cached
        return cached[1]

    def _find(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for generic in self._generic:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None

    def _wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse, send = lenient(handler.request_deserializer), handler.response_serializer
        method, counted = path.rsplit("/", 1)[-1], _service(path) not in self.open_during_drain
        # Health and reflection, which do not count for the drain, are not traced either: probes make no spans.
        span = path[1:] if counted else None
        guard = functools.partial(
            self._guard, method, request_streaming=handler.request_streaming, counted=counted, span=span
        )
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary), parse, send)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream), parse, send)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary), parse, send)
        return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream), parse, send)

    def _refuse(self, path: str, handler: grpc.RpcMethodHandler | None, refusal: Refusal) -> grpc.RpcMethodHandler:
        """A handler that ends the call with the gate's answer to a refusal, decided on the metadata alone.

        It takes a request *stream* whatever the method's kind, and never reads it: gRPC reads a unary request
        whole before calling its handler, which would let anyone without a token upload a full-size message.
        """
        method = path.rsplit("/", 1)[-1]

        async def answer(request, context):
            status = self.gate.refuse(refusal, method, path, context.peer())
            await context.abort(GRPC[status.code], status.message)

        async def answer_stream(request, context):
            await answer(request, context)
            yield  # never reached: answer() aborts; the yield makes this a streaming handler

        if handler is not None and not handler.response_streaming:
            return grpc.stream_unary_rpc_method_handler(answer, None, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(answer_stream, None, handler and handler.response_serializer)

    def _guard(self, method: str, behavior, request_streaming: bool, counted: bool, span: str | None):
        """The same behaviour inside `outcome`, of the same kind: gRPC tells streams by their function type."""
        outcome = functools.partial(self._outcome, counted=counted, span=span)
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
    async def _outcome(self, method: str, request, context, counted: bool, span: str | None) -> AsyncIterator[None]:
        """`span`: the call's span name ("pkg.Service/Method") when it is traced, None for one never traced."""
        CALL.set(context)
        name = getattr(request, "model", None) or getattr(request, "name", None) or getattr(request, "model_name", "")
        trace = None if span is None or self.gate.tracing is None else (span, context.invocation_metadata())
        async with self.gate.run("grpc", method, name if isinstance(name, str) else "", counted, trace) as call:
            remaining = context.time_remaining()
            if remaining is not None:  # gRPC itself cancels the call at its deadline
                call.limit(remaining, "the call's deadline", WIRE)
            if isinstance(request, Malformed):
                raise errors.InvalidArgument(request.message)
            try:
                yield
            except (asyncio.CancelledError, GeneratorExit):  # the client left, the deadline passed, the server stops
                call.code = cancelled(context)
                raise
            except grpc.aio.AbortError:  # the handler aborted itself: the status is already set
                call.code = code_set(context)
                raise
            call.code = code_set(context)
        if call.status is not None:
            await context.abort(GRPC[call.status.code], call.status.message)


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
