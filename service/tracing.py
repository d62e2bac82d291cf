"""OpenTelemetry tracing: off unless the standard OTEL_* variables ask for it, and free when off.

On/off, one rule: tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (otlp, console, or both,
comma-separated), or, with it unset, when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is
set (an endpoint given is a request to export there); `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true` turns
it off whatever else is set. Unlike the OTel SDK's own default (otlp to localhost), nothing set means off.

Off, `configure` returns None and nothing imports opentelemetry: the gate and the data plane check one None per call.
On, the gate starts one SERVER span per call (service/gate.py), continuing the caller's W3C `traceparent`; the data
plane adds events to it at the times the batcher measured on its worker threads (a worker thread never sees the
call's context, so it hands back times rather than spans): `queue`, `onnxruntime.run` (with the batch it ran in) and
`encode`, each at the start of its stage with its duration. Events rather than child spans: in the Python SDK a
child span costs several times an event to make and to export (bench/README.md, "Issue 25: tracing cost").
Health checks, reflection and /metrics make no spans (their adapters pass no carrier).
"""

from __future__ import annotations

import contextvars
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from service.errors import Code

if TYPE_CHECKING:  # the types only: opentelemetry is an optional extra (pip install gan-serve[tracing])
    from service.batcher import Timing
    from service.gate import Call

DEFAULT_SERVICE = "gan-serve"
EXPORTERS = ("otlp", "console")
ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
CONTEXT_FIELDS = ("traceparent", "tracestate")  # W3C trace context: what a caller's trace continues from
# Codes that are the server's fault on a server span (OTel's gRPC conventions); the others are the caller's, and
# leave the span's status unset. HTTP: 5xx.
SERVER_ERRORS = frozenset(
    [Code.UNKNOWN, Code.DEADLINE_EXCEEDED, Code.UNIMPLEMENTED, Code.INTERNAL, Code.UNAVAILABLE, Code.DATA_LOSS]
)
# BatchSpanProcessor settings taken from the environment given to `configure` (unset: the SDK's defaults).
BSP = {
    "OTEL_BSP_MAX_QUEUE_SIZE": "max_queue_size", "OTEL_BSP_SCHEDULE_DELAY": "schedule_delay_millis",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "max_export_batch_size", "OTEL_BSP_EXPORT_TIMEOUT": "export_timeout_millis",
}  # fmt: skip

DURATION = "gan.duration_s"  # an event marks the start of a stage; this attribute says how long it took
# The running call's span, when it is sampled: set by the gate in the call's own task, read by the data plane.
SPAN: contextvars.ContextVar[Any] = contextvars.ContextVar("span", default=None)


class TracingError(ValueError):
    """The OTEL_* settings cannot be used; the message names the variable."""


def exporters(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The exporters `environ` asks for, by the module's rule; () means tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not named:
        return ("otlp",) if any(environ.get(name, "").strip() for name in ENDPOINTS) else ()
    chosen = tuple(dict.fromkeys(part.strip() for part in named.split(",") if part.strip()))
    if "none" in chosen:
        return ()
    unknown = [name for name in chosen if name not in EXPORTERS]
    if unknown:
        raise TracingError(f"OTEL_TRACES_EXPORTER: unknown exporter {unknown[0]!r} (known: otlp, console, none)")
    return chosen


def configure(environ: Mapping[str, str]) -> Tracing | None:
    """A Tracing built from `environ` (os.environ in a server), or None when the rule says off.

    The OTLP exporter is gRPC (OTLP/HTTP is not installed); its endpoint, headers and insecure flag come from
    `environ`, its TLS files, timeout and compression from the process environment, as the exporter reads them.
    """
    chosen = exporters(environ)
    if not chosen:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise TracingError(
            "OTEL_*: tracing is asked for, but opentelemetry-sdk is not installed (pip install gan-serve[tracing])"
        ) from None
    attributes = _pairs(environ.get("OTEL_RESOURCE_ATTRIBUTES", ""), "OTEL_RESOURCE_ATTRIBUTES")
    attributes["service.name"] = environ.get("OTEL_SERVICE_NAME", "").strip() or DEFAULT_SERVICE
    provider = TracerProvider(resource=Resource.create(attributes), sampler=_sampler(environ))
    settings = {arg: int(_number(environ, name)) for name, arg in BSP.items() if environ.get(name, "").strip()}
    for name in chosen:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, environ), **settings))
    return Tracing(provider)


class Tracing:
    """A tracer provider and the spans this server makes of it. Every method is called on the event loop."""

    def __init__(self, provider: Any):
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("service")
        self._propagator = TraceContextTextMapPropagator()  # W3C only: OTEL_PROPAGATORS is the global API's
        self._server, self._error = trace.SpanKind.SERVER, trace.StatusCode.ERROR

    # ---- the call's span (service/gate.py) ---------------------------------------------------------------------

    def start(self, frontend: str, name: str, method: str, model: str, carrier: object) -> Any:
        """The call's SERVER span, a child of the caller's trace context in `carrier` (HTTP headers, or gRPC
        metadata pairs) when it has one. `name`: "pkg.Service/Method" for gRPC, "VERB /route" for HTTP."""
        if frontend == "grpc":
            service, _, rpc = name.rpartition("/")
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
        else:
            verb, _, route = name.partition(" ")
            attributes = {"http.request.method": verb, "http.route": route}
        attributes |= {"gan.method": method, "gan.model": model}
        parent = self._propagator.extract(_trace_context(carrier))
        span = self.tracer.start_span(name, parent, self._server, attributes)
        # An unsampled call gets no events: the data plane sees None and times nothing.
        SPAN.set(span if span.is_recording() else None)
        return span

    def answered(self, span: Any, http_status: int) -> None:
        """The HTTP status a call was answered with (set before the gate ends the span)."""
        span.set_attribute("http.response.status_code", http_status)

    def end(self, span: Any, call: Call) -> None:
        """End the call's span with how the call ended: its code, and ERROR where the fault is the server's."""
        code = call.code or Code.UNKNOWN
        if call.frontend == "grpc":
            span.set_attributes({"gan.code": code.name, "rpc.grpc.status_code": code.number})
            error = code in SERVER_ERRORS
        else:
            http = call.status.http if call.status is not None else None
            if http is not None:  # else the adapter set what it answered (answered())
                span.set_attributes({"gan.code": code.name, "http.response.status_code": http})
            else:
                span.set_attribute("gan.code", code.name)
            error = (http or code.http) >= 500
        if error:
            span.set_status(self._error, call.status.message if call.status is not None else code.name)
        span.end()

    # ---- events (service/dataplane.py) ------------------------------------------------------------------------

    def ran(self, span: Any, version: int, timings: Sequence[Timing]) -> None:
        """Events on `span` for each piece of the call that went through the batcher; `timings` are on the
        batcher's clock, time.monotonic (the registry's batchers use no other)."""
        span.set_attribute("gan.model.version", version)
        offset = time.time_ns() - time.monotonic_ns()
        event = span.add_event
        for t in timings:
            event("queue", {DURATION: t.taken - t.queued}, int(t.queued * 1e9) + offset)
            run = {DURATION: t.ran - t.taken, "gan.batch.size": t.batch_size, "gan.batch.requests": t.batch_requests,
                   "gan.batch.samples": t.samples, "gan.batch.id": t.batch}  # fmt: skip
            if t.done > t.ran:  # the batch's rows converted to uint8 pixels on the worker, after the run
                run["gan.to_uint8_s"] = t.done - t.ran
            if t.failed:
                run["gan.failed"] = True
            event("onnxruntime.run", run, int(t.taken * 1e9) + offset)

    def cached(self, span: Any, version: int) -> None:
        """A `cache.hit` event on `span`: the answer came from the response cache, and nothing ran."""
        span.set_attribute("gan.model.version", version)
        span.add_event("cache.hit")

    def encoded(self, span: Any, start_ns: int, fmt: str, images: int, grid: bool) -> None:
        """An `encode` event on `span` at `start_ns` (time.time_ns()), lasting until now: the result put in its
        format (PNG files, a grid, an array)."""
        attributes = {DURATION: (time.time_ns() - start_ns) / 1e9, "gan.format": fmt, "gan.images": images,
                      "gan.grid": grid}  # fmt: skip
        span.add_event("encode", attributes, start_ns)

    def shutdown(self) -> None:
        """Export what is queued and stop (blocks up to the exporter's timeout)."""
        self.provider.shutdown()


def current() -> Any:
    """The running call's span when it is traced and sampled, else None."""
    return SPAN.get()


def _trace_context(carrier: object) -> dict[str, str]:
    """traceparent and tracestate from HTTP headers (a case-insensitive mapping) or gRPC metadata (pairs)."""
    if isinstance(carrier, Mapping):
        found = {name: carrier.get(name) for name in CONTEXT_FIELDS}
    else:
        found = {key: value for key, value in carrier if key in CONTEXT_FIELDS} if carrier else {}
    return {name: value for name, value in found.items() if isinstance(value, str)}


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":  # stderr: stdout carries the server's one machine-readable line
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)
    protocol = _first(environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol != "grpc":
        raise TracingError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not served here; only grpc is installed")
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise TracingError(
            "OTEL_TRACES_EXPORTER: otlp needs opentelemetry-exporter-otlp-proto-grpc (pip install gan-serve[tracing])"
        ) from None
    insecure = _first(environ, "OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE")
    return OTLPSpanExporter(
        endpoint=_first(environ, *ENDPOINTS) or None,
        insecure=None if insecure is None else insecure.lower() == "true",
        headers=_first(environ, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS") or None,
    )


def _sampler(environ: Mapping[str, str]) -> Any:
    """OTEL_TRACES_SAMPLER (and _ARG) as the SDK reads them, from `environ`; default parentbased_always_on."""
    from opentelemetry.sdk.trace import sampling

    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    ratio = _number(environ, "OTEL_TRACES_SAMPLER_ARG", arg) if arg else 1.0
    if name.endswith("traceidratio") and not 0 <= ratio <= 1:
        raise TracingError(f"OTEL_TRACES_SAMPLER_ARG: a ratio in [0, 1] (got {arg})")
    on, off, ratio_based = sampling.ALWAYS_ON, sampling.ALWAYS_OFF, sampling.TraceIdRatioBased(ratio)
    parent = sampling.ParentBased
    samplers = {
        "always_on": on, "always_off": off, "traceidratio": ratio_based, "parentbased_always_on": parent(on),
        "parentbased_always_off": parent(off), "parentbased_traceidratio": parent(ratio_based),
    }  # fmt: skip
    if name not in samplers:
        raise TracingError(f"OTEL_TRACES_SAMPLER: unknown sampler {name!r} (known: {', '.join(samplers)})")
    return samplers[name]


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    """The value of the first of `names` that is set and not blank."""
    return next((environ[n].strip() for n in names if environ.get(n, "").strip()), None)


def _number(environ: Mapping[str, str], name: str, text: str | None = None) -> float:
    text = environ[name] if text is None else text
    try:
        return float(text)
    except ValueError:
        raise TracingError(f"{name}: a number (got {text!r})") from None


def _pairs(text: str, name: str) -> dict[str, str]:
    """ "k1=v1,k2=v2" (values percent-encoded), as OTEL_RESOURCE_ATTRIBUTES is written."""
    pairs: dict[str, str] = {}
    for item in (part for part in text.split(",") if part.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TracingError(f"{name}: key=value pairs separated by commas (got {item.strip()!r})")
        pairs[key.strip()] = unquote(value.strip())
    return pairs
