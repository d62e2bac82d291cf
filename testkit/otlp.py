"""OTLP/gRPC trace receivers on free loopback ports: a collector that keeps every span (tests), and a sink that only
counts what it is sent (benches, where decoding would cost the load's own process)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


def endpoint_env(port: int) -> dict[str, str]:
    """The OTEL_* variables that send a server's spans to a receiver on `port`."""
    return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}"}


class Collector(pb_grpc.TraceServiceServicer):
    """Keeps every export request it is sent."""

    def __init__(self) -> None:
        self.requests: list[pb.ExportTraceServiceRequest] = []

    async def Export(self, request: pb.ExportTraceServiceRequest, context) -> pb.ExportTraceServiceResponse:
        self.requests.append(request)
        return pb.ExportTraceServiceResponse()

    def spans(self) -> list[Span]:
        return [s for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def resources(self) -> list[dict[str, object]]:
        """The resource attributes of every batch of spans received."""
        return [attributes(rs.resource.attributes) for r in self.requests for rs in r.resource_spans]


@contextlib.asynccontextmanager
async def collector() -> AsyncIterator[tuple[Collector, dict[str, str]]]:
    """A Collector served by grpc.aio on this loop, and the OTEL_* variables that point a server at it."""
    kept = Collector()
    server = grpc.aio.server()
    pb_grpc.add_TraceServiceServicer_to_server(kept, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield kept, endpoint_env(port)
    finally:
        await server.stop(None)


class ThreadedCollector(Collector):
    """A Collector on gRPC's thread-pool server, for tests without an event loop (the fleet)."""

    def __init__(self) -> None:
        super().__init__()
        self.server = grpc.server(ThreadPoolExecutor(2, thread_name_prefix="otlp"))
        pb_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request: pb.ExportTraceServiceRequest, context) -> pb.ExportTraceServiceResponse:
        self.requests.append(request)
        return pb.ExportTraceServiceResponse()

    def spans_by_service(self) -> dict[str, list[Span]]:
        """Every span received, by the service.name of the process that sent it."""
        found: dict[str, list[Span]] = {}
        for r in self.requests:
            for rs in r.resource_spans:
                name = str(attributes(rs.resource.attributes).get("service.name"))
                found.setdefault(name, []).extend(s for ss in rs.scope_spans for s in ss.spans)
        return found

    @property
    def env(self) -> dict[str, str]:
        return endpoint_env(self.port)

    def close(self) -> None:
        self.server.stop(None)


class Sink:
    """Takes exports on a thread pool of its own and counts them, undecoded: what an exporter pays to send is
    paid in full, and the receiver costs next to nothing."""

    def __init__(self) -> None:
        self.exports = self.bytes = 0
        # No deserializer and no serializer: the request arrives as bytes, and b"" is an empty response message.
        handler = grpc.unary_unary_rpc_method_handler(self._export)
        self.server = grpc.server(ThreadPoolExecutor(2, thread_name_prefix="otlp-sink"))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Export": handler})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _export(self, request: bytes, context) -> bytes:
        self.exports += 1
        self.bytes += len(request)
        return b""

    @property
    def env(self) -> dict[str, str]:
        return endpoint_env(self.port)

    def close(self) -> None:
        self.server.stop(None)


def attributes(pairs: list[KeyValue]) -> dict[str, object]:
    """OTLP attributes as a dict of plain values."""
    return {kv.key: value(kv.value) for kv in pairs}


def value(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)
