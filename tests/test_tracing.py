"""OpenTelemetry tracing through the one gate: a span per call on both wires, continuing the caller's traceparent,
with events for the queue, the batch's run and the encoding; none for probes and scrapes; nothing at all, not
even an import, when it is off. Spans go over real OTLP/gRPC to a collector in the test (testkit.otlp)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from service.api.ganserve.v1 import generator_pb2 as pb
from service.tracing import TracingError, configure, exporters
from testkit.gated import Gate, sessions
from testkit.otlp import attributes, collector
from testkit.servefix import plain_model, running

ROOT = Path(__file__).resolve().parent.parent
TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"  # the W3C spec's example ids
OTHER_TRACE, OTHER_PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


def traceparent(trace: str, parent: str, sampled: bool = True) -> str:
    return f"00-{trace}-{parent}-{'01' if sampled else '00'}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracing")
    plain_model(root / "plain" / "1" / "model.onnx")
    plain_model(root / "slow" / "1" / "model.onnx")  # slow where a test gates its runs (testkit.gated)
    return root


def events(span: Span) -> dict[str, list[Span.Event]]:
    found: dict[str, list[Span.Event]] = {}
    for event in span.events:
        found.setdefault(event.name, []).append(event)
    return found


def server_spans(spans: list[Span]) -> dict[str, Span]:
    return {s.name: s for s in spans if s.kind == Span.SPAN_KIND_SERVER}


def test_the_rule_that_turns_tracing_on():
    assert exporters({}) == () and configure({}) is None
    assert exporters({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}) == ()  # settings alone: off
    assert exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == ("otlp",)
    assert exporters({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}) == ("otlp",)
    assert exporters({"OTEL_TRACES_EXPORTER": "console, otlp"}) == ("console", "otlp")
    assert exporters({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == ()
    assert exporters({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}) == ()
    with pytest.raises(TracingError, match="OTEL_TRACES_EXPORTER: unknown exporter 'jaeger'"):
        exporters({"OTEL_TRACES_EXPORTER": "jaeger"})
    with pytest.raises(TracingError, match="OTEL_TRACES_SAMPLER: unknown sampler 'sometimes'"):
        configure({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "sometimes"})
    with pytest.raises(TracingError, match="OTEL_EXPORTER_OTLP_PROTOCOL: 'http/protobuf'"):
        configure({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})


def test_a_call_on_each_wire_continues_the_caller_s_trace_with_its_queue_run_and_encoding(repo):
    async def go():
        async with collector() as (kept, env):
            tracing = configure(env | {"OTEL_SERVICE_NAME": "tracing-test"})
            async with (
                running(repo, tracing=tracing) as (server, stub, _),
                aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http,
            ):
                request = pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[1, 2]),
                                             output=pb.OutputOptions(format=pb.RAW_UINT8))  # fmt: skip
                await stub.Generate(request, metadata=(("traceparent", traceparent(TRACE, PARENT)),))
                headers = {"traceparent": traceparent(OTHER_TRACE, OTHER_PARENT)}
                body = {"parameters": {"seeds": "3,4,5"}}
                async with http.post("/v2/models/plain/infer", json=body, headers=headers) as r:
                    assert r.status == 200, await r.text()
            return kept.spans(), kept.resources()  # the server's stop exported what it still held

    spans, resources = asyncio.run(go())
    assert all(r["service.name"] == "tracing-test" for r in resources)
    calls = server_spans(spans)
    assert set(calls) == {"ganserve.v1.Generator/Generate", "POST /v2/models/{model}/infer"}

    rpc = calls["ganserve.v1.Generator/Generate"]
    assert (rpc.trace_id.hex(), rpc.parent_span_id.hex()) == (TRACE, PARENT)
    assert attributes(rpc.attributes) == {
        "rpc.system": "grpc", "rpc.service": "ganserve.v1.Generator", "rpc.method": "Generate",
        "gan.method": "Generate", "gan.model": "plain", "gan.model.version": 1, "gan.code": "OK",
        "rpc.grpc.status_code": 0,
    }  # fmt: skip
    assert len(spans) == 2  # the calls' own: what happened inside each is in its events
    stages = events(rpc)
    assert sorted(stages) == ["encode", "onnxruntime.run", "queue"]
    (queue,), (run,), (encode,) = stages["queue"], stages["onnxruntime.run"], stages["encode"]
    batch = attributes(run.attributes)
    assert batch["gan.batch.samples"] == 2 and batch["gan.batch.size"] >= 2 and batch["gan.batch.requests"] >= 1
    assert batch["gan.duration_s"] > 0 and batch["gan.to_uint8_s"] > 0  # raw uint8: converted on the worker
    coded = attributes(encode.attributes)
    assert (coded["gan.format"], coded["gan.images"], coded["gan.grid"]) == ("UINT8", 2, False)
    # Each event at the start of its stage, with its duration: the worker's times, in order, inside the call.
    wait = attributes(queue.attributes)["gan.duration_s"]
    assert rpc.start_time_unix_nano <= queue.time_unix_nano <= run.time_unix_nano <= encode.time_unix_nano
    assert abs(queue.time_unix_nano + wait * 1e9 - run.time_unix_nano) < 1e3  # the wait ends as the run begins
    assert encode.time_unix_nano + coded["gan.duration_s"] * 1e9 <= rpc.end_time_unix_nano + 1e3

    rest = calls["POST /v2/models/{model}/infer"]
    assert (rest.trace_id.hex(), rest.parent_span_id.hex()) == (OTHER_TRACE, OTHER_PARENT)
    got = attributes(rest.attributes)
    assert got["http.request.method"] == "POST" and got["http.route"] == "/v2/models/{model}/infer"
    assert (got["gan.method"], got["gan.model"], got["gan.model.version"]) == ("http.infer", "plain", 1)
    assert got["http.response.status_code"] == 200 and rest.status.code == Status.STATUS_CODE_UNSET
    stages = events(rest)
    assert sorted(stages) == ["encode", "onnxruntime.run", "queue"]
    run = attributes(stages["onnxruntime.run"][0].attributes)
    assert run["gan.batch.samples"] == 3 and "gan.to_uint8_s" not in run  # FP32: nothing to convert


def test_probes_scrapes_and_unsampled_calls_make_no_spans(repo):
    async def go():
        async with collector() as (kept, env):
            async with (
                running(repo, tracing=configure(env), metrics_port=0) as (server, stub, channel),
                aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http,
            ):
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
                    async with http.get(path) as r:
                        assert r.status == 200, path
                # The caller's trace is not sampled: this server's part of it is not either.
                unsampled = (("traceparent", traceparent(TRACE, PARENT, sampled=False)),)
                await stub.ListModels(pb.ListModelsRequest(), metadata=unsampled)
                await stub.ListModels(pb.ListModelsRequest())  # the one call that is traced: export works
            return kept.spans()

    spans = asyncio.run(go())
    assert [s.name for s in spans] == ["ganserve.v1.Generator/ListModels"]
    assert spans[0].parent_span_id == b""  # no traceparent: a trace of its own


def test_an_answer_from_the_response_cache_is_an_event_and_nothing_ran(repo):
    async def go():
        async with collector() as (kept, env):
            async with running(repo, tracing=configure(env), response_cache_bytes=1 << 20) as (_, stub, _channel):
                for _ in range(2):
                    await stub.Generate(pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[7])))
            return kept.spans()

    first, again = sorted(asyncio.run(go()), key=lambda s: s.start_time_unix_nano)
    assert sorted(events(first)) == ["encode", "onnxruntime.run", "queue"]
    assert list(events(again)) == ["cache.hit"] and attributes(again.attributes)["gan.model.version"] == 1


def test_a_failed_call_s_span_carries_its_status_code(repo):
    gate = Gate()

    async def go():
        async with collector() as (kept, env):
            async with (
                running(repo, session_factory=sessions(slow=gate.wait), tracing=configure(env)) as (server, stub, _),
                aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http,
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Generate(pb.GenerateRequest(model="nope", seeds=pb.SeedList(seeds=[1])))
                async with http.post("/v2/models/nope/infer", json={"parameters": {"seeds": "1"}}) as r:
                    missing = r.status
                # Its run is held at the gate until after its deadline: 504 from the gate, never from a sleep.
                body, timeout = {"parameters": {"seeds": "1"}}, {"X-Request-Timeout": "0.05"}
                async with http.post("/v2/models/slow/infer", json=body, headers=timeout) as r:
                    late = r.status
                gate.open()
            return refused.value.code(), missing, late, kept.spans()

    code, missing, late, spans = asyncio.run(go())
    assert (code, missing, late) == (grpc.StatusCode.NOT_FOUND, 404, 504)
    calls = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    by_model = {(s.name, attributes(s.attributes)["gan.model"]): s for s in calls}
    rpc = by_model["ganserve.v1.Generator/Generate", "unknown"]
    assert attributes(rpc.attributes)["rpc.grpc.status_code"] == 5
    assert attributes(rpc.attributes)["gan.code"] == "NOT_FOUND"
    assert rpc.status.code == Status.STATUS_CODE_UNSET  # the caller's fault, not the server's
    rest = attributes(by_model["POST /v2/models/{model}/infer", "unknown"].attributes)
    assert (rest["http.response.status_code"], rest["gan.code"]) == (404, "NOT_FOUND")
    slow = by_model["POST /v2/models/{model}/infer", "slow"]
    assert attributes(slow.attributes)["http.response.status_code"] == 504
    assert slow.status.code == Status.STATUS_CODE_ERROR
    assert slow.status.message == "deadline: X-Request-Timeout (0.05 s) passed before the call finished"


OFF = textwrap.dedent("""
    import asyncio, json, os, sys
    from pathlib import Path

    import aiohttp

    from service.api.ganserve.v1 import generator_pb2 as pb
    from service.tracing import configure
    from testkit.servefix import running

    async def go():
        async with running(Path(sys.argv[1]), tracing=configure(os.environ)) as (server, stub, _):
            await stub.Generate(pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[1])))
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
                async with http.post("/v2/models/plain/infer", json={"parameters": {"seeds": "1"}}) as r:
                    assert r.status == 200

    asyncio.run(go())
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")))
""")


def test_off_nothing_is_exported_and_opentelemetry_is_never_imported(repo):
    """OTEL_SDK_DISABLED wins over an endpoint: a server process that serves both wires imports no opentelemetry."""

    async def go():
        async with collector() as (kept, env):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", OFF, str(repo), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                env=os.environ | env | {"OTEL_SDK_DISABLED": "true"},
            )  # fmt: skip
            out, _ = await proc.communicate()
            return proc.returncode, out.decode(), kept.requests

    status, out, received = asyncio.run(go())
    assert status == 0
    assert json.loads(out.splitlines()[-1]) == [] and received == []
