"""The one interceptor: every method of every registered service is counted and has its errors mapped."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from service import errors
from service.api.ganserve.v1 import generator_pb2 as pb
from service.frontends import ganserve
from service.gate import Gate
from service.interceptor import CALL, LATE_REPLIES, Gated
from service.metrics import Metrics
from testkit.servefix import call_raw, plain_model, running
from testkit.waiting import until


def calls_by_method(registry: CollectorRegistry) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for family in registry.collect():
        if family.name == "gan_requests":
            for sample in family.samples:
                if sample.name == "gan_requests_total":
                    counts[sample.labels["method"], sample.labels["code"]] += sample.value
    return counts


def test_every_method_of_every_registered_service_is_covered(tmp_path):
    plain_model(tmp_path / "plain" / "1" / "model.onnx")

    async def go():
        async with running(tmp_path) as (server, _stub, channel):
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            listing = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            listed = {s.name async for r in listing for s in r.list_services_response.service}
            methods = []
            for service in server.services:
                for method in service.methods:
                    path = f"/{service.full_name}/{method.name}"
                    await call_raw(channel, path, method.client_streaming, method.server_streaming)
                    methods.append(method.name)
            # A cancelled stream's handler records its outcome as it unwinds: wait for that record.
            await until(lambda: calls_by_method(server.metrics.registry)["Watch", "DEADLINE_EXCEEDED"] == 1)
            return listed, server.services, methods, calls_by_method(server.metrics.registry)

    listed, services, methods, counts = asyncio.run(go())
    assert listed == {s.full_name for s in services}  # what the server registers, no more, no less
    assert len(methods) == sum(len(s.methods) for s in services) >= 8
    for name in methods:
        assert sum(n for (method, _code), n in counts.items() if method == name) >= 1, name
    assert counts["Generate", "INVALID_ARGUMENT"] == 1  # an empty request names no model
    assert counts["Check", "OK"] == 1 and counts["Watch", "DEADLINE_EXCEEDED"] == 1


def test_a_method_added_later_is_mapped_and_counted_without_being_listed():
    """A service no list in the code knows: domain errors map, bugs stay private, streams are covered."""

    async def invalid(request, context):
        raise errors.InvalidArgument("field: not like that")

    async def bug(request, context):
        raise KeyError("/secret/path")

    async def stream(request, context):
        yield b"first"
        raise errors.QueueFull("queue: full")

    async def aborts(request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    handlers = grpc.method_handlers_generic_handler(
        "test.Later",
        {
            "Invalid": grpc.unary_unary_rpc_method_handler(invalid),
            "Bug": grpc.unary_unary_rpc_method_handler(bug),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Aborts": grpc.unary_unary_rpc_method_handler(aborts),
        },
    )

    async def go():
        metrics = Metrics(CollectorRegistry())
        gated = Gated(Gate(metrics, lambda name: False))
        server = grpc.aio.server(handlers=[gated])
        gated.add_generic_rpc_handlers((handlers,))  # registered after the server was made
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        outcomes = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for name in ("Invalid", "Bug", "Aborts"):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await channel.unary_unary(f"/test.Later/{name}")(b"")
                    outcomes[name] = err.value.code(), err.value.details()
                received = []
                call = channel.unary_stream("/test.Later/Stream")(b"")
                received.append(await call.read())
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                outcomes["Stream"] = err.value.code(), err.value.details(), received
        finally:
            await server.stop(None)
        return outcomes, calls_by_method(metrics.registry)

    outcomes, counts = asyncio.run(go())
    assert outcomes["Invalid"] == (grpc.StatusCode.INVALID_ARGUMENT, "field: not like that")
    assert outcomes["Bug"] == (grpc.StatusCode.INTERNAL, "internal error")  # no exception text reaches the client
    assert outcomes["Aborts"] == (grpc.StatusCode.PERMISSION_DENIED, "no")
    assert outcomes["Stream"] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue: full", [b"first"])
    assert counts == {
        ("Invalid", "INVALID_ARGUMENT"): 1, ("Bug", "INTERNAL"): 1, ("Aborts", "PERMISSION_DENIED"): 1,
        ("Stream", "RESOURCE_EXHAUSTED"): 1,
    }  # fmt: skip


def test_a_client_leaving_mid_stream_is_counted_as_cancelled(tmp_path):
    plain_model(tmp_path / "plain" / "1" / "model.onnx")

    async def go():
        async with running(tmp_path, stream_chunk=1) as (server, stub, _ch):
            call = stub.GenerateStream(pb.GenerateRequest(model="plain", seed_range=pb.SeedRange(count=5000)))
            await call.read()
            call.cancel()
            registry = server.metrics.registry
            await until(lambda: calls_by_method(registry)["GenerateStream", "CANCELLED"] == 1)
            return calls_by_method(registry)

    counts = asyncio.run(go())
    assert {code for method, code in counts if method == "GenerateStream"} == {"CANCELLED"}


def test_counts_are_refused_before_any_item_is_converted(tmp_path, monkeypatch):
    """2,000 labels over a limit of 1,024: refused by the length alone, no label is built."""
    plain_model(tmp_path / "plain" / "1" / "model.onnx")
    converted = []
    monkeypatch.setattr(ganserve, "to_label", lambda msg: converted.append(msg))

    async def go():
        async with running(tmp_path) as (_, stub, _ch):
            request = pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[1]), labels=[pb.Label(index=0)] * 2000)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request)
            return err.value

    err = asyncio.run(go())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("labels: 2000 given")
    assert converted == []


class _Context:
    """The one thing LateReplyFilter asks of a call: how long it has left."""

    def __init__(self, left: float | None):
        self.left = left

    def time_remaining(self) -> float | None:
        return self.left


@pytest.mark.parametrize(
    ("message", "left", "logged"),
    [
        ("ExecuteBatchError raised in core by servicer method [/ganserve.v1.Generator/Generate]", -0.001, False),
        ("ExecuteBatchError raised in core by servicer method [/ganserve.v1.Generator/Generate]", 3.0, True),  # too big
        ("ExecuteBatchError raised in core by servicer method [/ganserve.v1.Generator/Generate]", None, True),
        ("some other grpc error", -1.0, True),
    ],
)
def test_only_a_reply_that_lost_the_race_with_its_deadline_goes_unlogged(message, left, logged):
    record = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1, message, None, None)

    def decide() -> bool:
        CALL.set(_Context(left))
        return LATE_REPLIES.filter(record)

    assert contextvars.copy_context().run(decide) is logged


def test_a_reflection_stream_with_a_body_that_does_not_parse_gets_invalid_argument(tmp_path):
    plain_model(tmp_path / "plain" / "1" / "model.onnx")

    async def go():
        async with running(tmp_path) as (_server, _stub, channel):
            call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in call(iter([b"\xff\xff"]), timeout=5):
                    pass
            return e.value

    error = asyncio.run(go())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "request: the body is not a valid grpc.reflection.v1alpha.ServerReflectionRequest"
