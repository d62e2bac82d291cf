"""One gate per call, whatever the wire: admission (tokens, roles, the audit line, the failure counter), drain
accounting, the call's deadline and cancellation, request metrics, and exceptions → status through the one table.

The gRPC interceptor (service/interceptor.py) and the HTTP middleware (service/http.py) are thin adapters over it:
each turns its wire's metadata into a method path and headers, runs the handler inside `Gate.run`, and turns the
Status it gets back into its own answer. Neither knows the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.errors import Code, Status, short, status_of
from service.metrics import UNKNOWN_MODEL, Metrics
from service.security import Authorizer, Refusal

if TYPE_CHECKING:
    from service.tracing import Tracing

log = logging.getLogger(__name__)

CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar("call", default=None)
DRAINING = "draining"  # the refusal reason of a call that arrives during a drain
# How often deadlines enforced by sweep (server defaults) are looked at. A loop timer per call would cost ~8% of
# small-request throughput over REST (measured); one sweep a second costs nothing per call, and a 60 s default
# passing up to a second late changes nothing anyone relies on.
SWEEP_S = 1.0
TIMER, SWEEP, WIRE = "timer", "sweep", "wire"  # how a deadline is enforced: Call.limit


def current() -> Call | None:
    """The call the running task serves (each gRPC call and each HTTP request runs in a task of its own)."""
    return CURRENT.get()


def deadline() -> float | None:
    """The running call's deadline on the batcher's clock (time.monotonic), for the data plane; None: none."""
    call = CURRENT.get()
    return None if call is None else call.deadline


@dataclass(eq=False)
class Call:
    """One call in flight: what the metrics record, its deadline, and how it ended."""

    frontend: str  # "grpc" or "http": the label of the cancellation counter
    method: str
    model: str
    start: float  # time.perf_counter() when it arrived
    task: asyncio.Task | None = None
    deadline: float | None = None  # time.monotonic(); the data plane drops queued work past it
    source: str = ""  # what set the deadline, named in the DEADLINE_EXCEEDED message
    fallback: bool = False  # the deadline is a default that the request's own deadline replaces
    code: Code | None = None  # set by an adapter whose wire answered the call itself
    status: Status | None = None  # set when the call failed; the adapter answers with it
    expired: bool = False
    _timer: asyncio.TimerHandle | None = None
    gate: Gate | None = None  # whose sweep enforces a SWEEP deadline
    span: Any = None  # its OpenTelemetry span, when the call is traced

    def limit(self, seconds: float, source: str, enforce: str = TIMER, fallback: bool = False) -> None:
        """Tighten the deadline to `seconds` from now: a later one changes nothing, unless what holds now is a
        `fallback` (a server default, a header) and this one is the request's own. Past it the call is cancelled
        and answers DEADLINE_EXCEEDED naming `source`: on time (TIMER), within SWEEP_S (SWEEP), or by the wire."""
        deadline = time.monotonic() + max(0.0, seconds)
        if self.deadline is not None and self.deadline <= deadline and (fallback or not self.fallback):
            return
        self.deadline, self.source, self.fallback = deadline, source, fallback
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.gate is not None:
            self.gate.unwatch(self)
        if enforce == TIMER and self.task is not None:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, seconds), self._expire)
        elif enforce == SWEEP and self.gate is not None:
            self.gate.watch(self)

    def _expire(self) -> None:
        self.expired = True
        self.task.cancel()


class Gate:
    """What every call shares. While draining (`drain()`), new calls are refused with UNAVAILABLE, except the ones
    an adapter does not count (health probes), and the counted calls still running are waited for."""

    def __init__(
        self, metrics: Metrics, is_model: Callable[[str], bool], authorizer: Authorizer | None = None,
        tracing: Tracing | None = None,
    ):  # fmt: skip
        """`tracing`: the spans of calls that adapters trace (service/tracing.py); None, tracing is off."""
        self.metrics, self.is_model, self.authorizer, self.tracing = metrics, is_model, authorizer, tracing
        self._children: dict[tuple[str, str, Code], tuple] = {}  # labels() per call costs more
        self.active = 0  # counted calls inside a handler
        self.last_arrival = 0.0  # time.monotonic() of the last counted call admitted
        self._idle: asyncio.Event | None = None
        self.draining = False
        self._swept: set[Call] = set()
        self._sweeper: asyncio.Task | None = None

    # ---- admission ---------------------------------------------------------------------------------------------

    def admit(self, path: str, headers: Sequence[tuple[str, str | bytes]] | None, counted: bool) -> Refusal | None:
        """None when a call to `path` (/package.Service/Method) may start, else why not: decided on its metadata
        alone, before its body is read. `counted`: the call counts for the drain (probes do not)."""
        if counted and self.draining:  # a clear, retryable answer rather than a dropped connection
            return Refusal(Code.UNAVAILABLE, DRAINING, "server: shutting down")
        if self.authorizer is not None:
            refusal = self.authorizer.check(path, headers)
            if refusal is not None:
                return refusal
        if counted:  # after the token check: a caller without one cannot keep a drain from ending
            self.last_arrival = time.monotonic()
        return None

    def refuse(self, refusal: Refusal, method: str, path: str, peer: str) -> Status:
        """Record, count and audit a refused call; the Status to answer it with."""
        code = refusal.code if isinstance(refusal.code, Code) else Code[refusal.code.name]
        if refusal.reason != DRAINING:
            self.metrics.auth_failures.labels(refusal.reason).inc()
            # The audit line: never the token itself; the path quoted, so that a %0A in a URL cannot forge a line.
            token = refusal.token or "-"
            log.warning("refused %s from %s: %s (token %s)", short(path, 200), peer, refusal.reason, token)
        self.record(method, UNKNOWN_MODEL, code, time.perf_counter())
        return Status(code, refusal.message)

    # ---- one call ----------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def run(
        self, frontend: str, method: str, model: str, counted: bool = True, trace: tuple[str, object] | None = None
    ) -> AsyncIterator[Call]:
        """The handler runs inside; afterwards `call.status` holds the failure the adapter answers with (None: OK).

        `trace` (span name, the wire's headers or metadata) makes the call a span; an adapter passes it only when
        `self.tracing` is set, and never for probes and scrapes.
        Cancellation (the client left, the wire's deadline) passes through after it is counted; a deadline set with
        `Call.limit` ends the call here with DEADLINE_EXCEEDED. Any other exception becomes a Status, logged with its
        traceback when it maps to INTERNAL, never shown to the client.
        """
        call = Call(frontend, method, model if model and self.is_model(model) else UNKNOWN_MODEL,
                    time.perf_counter(), asyncio.current_task(), gate=self)  # fmt: skip
        CURRENT.set(call)
        if trace is not None:
            call.span = self.tracing.start(frontend, trace[0], method, call.model, trace[1])
        self.active += counted
        try:
            yield call
            call.code = call.code or Code.OK
        except GeneratorExit:  # a stream closed by its consumer: nothing to answer
            call.code = call.code or Code.CANCELLED
            raise
        except asyncio.CancelledError:
            if not call.expired:
                call.code = call.code or Code.CANCELLED
                if counted:  # not health watches and reflection streams, which end this way by design
                    self.metrics.cancelled.labels(frontend, call.code.name).inc()
                raise
            if hasattr(call.task, "uncancel"):  # Python 3.11+: this cancellation was ours, and it is handled
                call.task.uncancel()
            self.metrics.cancelled.labels(frontend, Code.DEADLINE_EXCEEDED.name).inc()
            call.status = Status(Code.DEADLINE_EXCEEDED, f"deadline: {call.source} passed before the call finished")
            call.code = call.status.code
        except Exception as exc:
            if call.code is not None:  # the wire answered it already (a gRPC abort)
                raise
            call.status = status_of(exc)
            call.code = call.status.code
            if call.code is Code.INTERNAL:
                log.exception("%s failed", method, exc_info=exc)
        finally:
            if call._timer is not None:
                call._timer.cancel()
            self._swept.discard(call)
            self.active -= counted
            if not self.active and self._idle is not None:
                self._idle.set()
            self.record(method, call.model, call.code or Code.UNKNOWN, call.start)
            if call.span is not None:
                self.tracing.end(call.span, call)

    def watch(self, call: Call) -> None:
        """Enforce `call`'s deadline by sweep; the sweep starts when needed and ends when no call needs it."""
        self._swept.add(call)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())

    def unwatch(self, call: Call) -> None:
        self._swept.discard(call)

    async def _sweep(self) -> None:
        while self._swept:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for call in [c for c in self._swept if c.deadline is not None and c.deadline <= now]:
                self._swept.discard(call)
                call._expire()

    def record(self, method: str, model: str, code: Code, start: float) -> None:
        """Count and time one call (`start`: time.perf_counter() when it arrived)."""
        key = (method, model, code)
        children = self._children.get(key)
        if children is None:
            m = self.metrics
            children = m.requests.labels(method, model, code.name), m.request_seconds.labels(method, model)
            self._children[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - start)

    # ---- drain -------------------------------------------------------------------------------------------------

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
