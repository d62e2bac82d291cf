"""Faults under load: a closed loop of 16 callers (Generate, GenerateStream, Interpolate; several models and
versions) runs while versions arrive, break, leave, the queue overflows and the server stops. Every call is
counted (testkit/load.py); bench/soak.py is the long version.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator

import grpc
import onnx

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from testkit.gated import Gate, sessions
from testkit.load import Shape, Tally, Target, closed_loop
from testkit.servefix import ECHO_CLASSES, drained, echo_model, plain_model, running
from testkit.waiting import until

CALLERS = 16
OK, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def load(channel: grpc.aio.Channel, targets: list[Target], **options) -> AsyncIterator[Tally]:
    """The closed loop, running for the body of the `with`; its tally holds every call once it ends."""
    stop, tally = asyncio.Event(), Tally()
    task = asyncio.ensure_future(closed_loop(channel, targets, CALLERS, stop, tally=tally, **options))
    await until(lambda: tally.completed() >= CALLERS)  # warmed up: every caller got an answer
    try:
        yield tally
    finally:
        stop.set()
        await task


async def settle(tally: Tally, calls: int = 2 * CALLERS) -> None:
    """Let the loop run a little: `calls` more calls finish."""
    done = len(tally.calls)
    await until(lambda: len(tally.calls) >= done + calls)


def failures(tally: Tally) -> list[str]:
    return [f"{c.method} {c.model} v{c.requested}: {c.code.name} {c.details}" for c in tally.failures()]


def test_new_versions_join_under_load_through_poll_sighup_and_load_model(tmp_path):
    plain_model(tmp_path / "a" / "1" / "model.onnx")
    echo_model(tmp_path / "b" / "1" / "model.onnx")
    targets = [Target("a"), Target("b", classes=len(ECHO_CLASSES))]

    async def go():
        async with (
            running(tmp_path, model_control="poll", poll_seconds=0.5) as (server, _stub, channel),
            load(channel, targets) as tally,
        ):
            placed = {}
            for version, trigger in ((2, "poll"), (3, "sighup"), (4, "load_model")):
                plain_model(tmp_path / "a" / ".staging" / "model.onnx")
                (tmp_path / "a" / ".staging").rename(tmp_path / "a" / str(version))  # appears whole
                placed[version] = time.monotonic()
                if trigger == "sighup":
                    await server.reload()
                elif trigger == "load_model":
                    await pb_grpc.ModelAdminStub(channel).LoadModel(pb.LoadModelRequest(name="a", version=version))
                await until(lambda v=version: server.registry.versions("a") == [v])
                await settle(tally)
        return tally, placed

    tally, placed = run(go())
    assert failures(tally) == []
    first, last = tally.first_seen("a"), tally.last_sent("a")
    for version in (2, 3, 4):
        # Requests without a version moved to it within one poll interval (and the load's time), and none sent
        # after that went to the version before it.
        assert first[version] - placed[version] < 0.5 + 2.0
        assert last[version - 1] < first[version]
    assert set(tally.first_seen("b")) == {1}


def test_corrupt_versions_are_rejected_under_load_and_the_old_one_keeps_serving(tmp_path):
    good = plain_model(tmp_path / "a" / "1" / "model.onnx")
    targets = [Target("a")]

    async def go():
        async with running(tmp_path) as (server, _stub, channel), load(channel, targets) as tally:
            # A truncated file.
            (tmp_path / "a" / "2").mkdir()
            data = good.read_bytes()
            (tmp_path / "a" / "2" / "model.onnx").write_bytes(data[: len(data) // 2])
            # Wrong metadata: a latent size its graph does not take.
            wrong = onnx.load(str(good))
            for prop in wrong.metadata_props:
                if prop.key == "latent_dim":
                    prop.value = "7"
            (tmp_path / "a" / "3").mkdir()
            onnx.save(wrong, str(tmp_path / "a" / "3" / "model.onnx"))
            # A directory still being written: half the file so far.
            (tmp_path / "a" / "4").mkdir()
            (tmp_path / "a" / "4" / "model.onnx").write_bytes(data[: len(data) // 3])
            await server.reload()
            await settle(tally)
            states = {s.version: s.state for s in server.registry.status("a")}
            # The copy finishes: the next rescan loads it, and it replaces version 1.
            (tmp_path / "a" / "4" / "model.onnx").write_bytes(data)
            await server.reload()
            await settle(tally)
        return tally, states

    tally, states = run(go())
    assert failures(tally) == []
    assert states == {1: "READY", 2: "FAILED", 3: "FAILED", 4: "FAILED"}
    assert set(tally.first_seen("a")) == {1, 4}


def test_removed_versions_finish_their_requests_and_others_are_untouched(tmp_path):
    for version in (1, 2, 3, 4):
        echo_model(tmp_path / "b" / str(version) / "model.onnx")
    (tmp_path / "b" / "model.json").write_text('{"version_policy": "all"}')
    plain_model(tmp_path / "a" / "1" / "model.onnx")
    classes = len(ECHO_CLASSES)
    targets = [Target("a"), Target("b", classes=classes), *(Target("b", v, classes) for v in (1, 2, 3, 4))]

    async def go():
        removed, held = {}, {}
        async with running(tmp_path) as (server, _stub, channel), load(channel, targets) as tally:
            await until(lambda v=1: server.registry.get("b", v).users > 0)  # catch it with requests in flight
            held[1] = server.registry.get("b", 1).users
            removed[1] = time.monotonic()  # through a policy change
            (tmp_path / "b" / "model.json").write_text('{"version_policy": "specific:2,3,4"}')
            await server.reload()
            await settle(tally)
            await until(lambda v=2: server.registry.get("b", v).users > 0)  # catch it with requests in flight
            held[2] = server.registry.get("b", 2).users
            removed[2] = time.monotonic()  # through UnloadModel
            await pb_grpc.ModelAdminStub(channel).UnloadModel(pb.UnloadModelRequest(name="b", version=2))
            await settle(tally)
            await until(lambda v=3: server.registry.get("b", v).users > 0)  # catch it with requests in flight
            held[3] = server.registry.get("b", 3).users
            removed[3] = time.monotonic()  # deleted from disk
            shutil.rmtree(tmp_path / "b" / "3")
            await server.reload()
            await settle(tally)
            await until(lambda: drained(server))  # drained and freed
        return tally, removed, held

    tally, removed, held = run(go())
    for call in tally.calls:
        if call.model == "b" and call.requested in removed:
            # The requests a version held when it left finished on it (no other code appears); later ones were
            # told, naming what is left.
            assert call.ok or call.code == NOT_FOUND, call
            if call.code == NOT_FOUND:
                assert call.end > removed[call.requested], call
                assert f"has no version {call.requested} (versions: [" in call.details
        else:
            assert call.ok, call
    assert min(held.values()) > 0
    assert {c.requested for c in tally.calls if c.code == NOT_FOUND} == {1, 2, 3}


def test_sigterm_under_load_finishes_every_accepted_call(tmp_path):
    plain_model(tmp_path / "a" / "1" / "model.onnx")
    echo_model(tmp_path / "b" / "1" / "model.onnx")
    targets = [Target("a"), Target("b", classes=len(ECHO_CLASSES))]
    gate = Gate(is_open=True)  # model a's runs pass until the test closes it

    async def go():
        async with running(tmp_path, session_factory=sessions(a=gate.wait)) as (server, _stub, channel):
            stop, tally = asyncio.Event(), Tally()
            loop = asyncio.ensure_future(closed_loop(channel, targets, CALLERS, stop, tally=tally))
            await until(lambda: tally.completed() >= CALLERS)
            gate.close()
            await gate.reached(held=True)  # calls to a are accepted and held inside the model at the SIGTERM
            began, accepted = time.monotonic(), server.gate.active
            stopping = asyncio.ensure_future(server.stop(grace=30))
            await until(lambda: sum(c.code == grpc.StatusCode.UNAVAILABLE for c in tally.calls) >= CALLERS)
            gate.open()  # only now can the held calls finish: well inside the grace period
            stop.set()  # the clients move on, as they do once the endpoint is gone
            await loop
            await stopping
            codes = {s.labels["code"] for s in server.metrics.requests.collect()[0].samples if s.value}
            return tally, began, accepted, codes

    tally, began, accepted, codes = run(go())
    # The calls the server held at the SIGTERM finished whole (no other code appears); later ones got UNAVAILABLE.
    assert accepted > 0 and codes == {"OK", "UNAVAILABLE"}
    assert any(c.ok and c.model == "a" and c.start < began < c.end for c in tally.calls)  # held across it
    for call in tally.calls:
        assert call.ok or call.code == grpc.StatusCode.UNAVAILABLE, call
        if not call.ok:
            assert call.end > began and call.details == "server: shutting down"


def test_overload_answers_resource_exhausted_at_once_and_recovers(tmp_path):
    plain_model(tmp_path / "a" / "1" / "model.onnx")
    flags = dict(max_batch_size=16, max_queue=64, max_images=64, batch_workers=1)
    gate = Gate(is_open=True)

    async def go():
        async with running(tmp_path, session_factory=sessions(a=gate.wait), **flags) as (_server, stub, channel):
            async with load(channel, [Target("a")], shape=Shape(images=16, stream_images=16), timeout=30) as tally:
                gate.close()  # the worker stops at its next batch: the queue fills and nothing leaves it
                await gate.reached(held=True)
                closed = time.monotonic()
                await until(lambda: sum(c.code == grpc.StatusCode.RESOURCE_EXHAUSTED and c.start >= closed
                                        for c in tally.calls) >= 50)  # fmt: skip
                opened = time.monotonic()
                gate.open()
            after = await stub.Generate(pb.GenerateRequest(model="a", seed_range=pb.SeedRange(count=16)), timeout=30)
            return tally, closed, opened, len(after.images)

    tally, closed, opened, images = run(go())
    full = [c for c in tally.calls if c.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert {c.code for c in tally.calls} == {OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("batch queue is full" in c.details for c in full)
    # Refused on arrival, not after waiting behind the queue: 50 refusals came back while the worker was held and
    # the queue could not move at all.
    assert sum(closed <= c.start and c.end < opened for c in full) >= 50
    assert images == 16  # and it recovers


def test_rapid_triggers_under_load_load_each_version_once(tmp_path):
    plain_model(tmp_path / "a" / "1" / "model.onnx")
    echo_model(tmp_path / "b" / "1" / "model.onnx")
    targets = [Target("a"), Target("b", classes=len(ECHO_CLASSES))]

    async def go():
        async with running(tmp_path) as (server, _stub, channel):
            async with load(channel, targets) as tally:
                plain_model(tmp_path / "a" / "2" / "model.onnx")
                echo_model(tmp_path / "b" / "2" / "model.onnx")
                admin = pb_grpc.ModelAdminStub(channel)
                await asyncio.gather(
                    *(server.reload() for _ in range(20)), admin.LoadModel(pb.LoadModelRequest(name="b", version=2))
                )
                await settle(tally)
            loads = {m: server.metrics.registry.get_sample_value(
                "gan_model_loads_total", {"model": m, "result": "success"}) for m in ("a", "b")}  # fmt: skip
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return tally, loads, left

    tally, loads, left = run(go())
    assert failures(tally) == [] and loads == {"a": 2, "b": 2} and left == []
