"""The model lifecycle (service/registry.py): versions join and leave without failing a request.

Each test here is one of the faults once measured against the old reload path, or one line of the promise in the
README's "Model lifecycle" section.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import threading
import weakref

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.runtime import Session
from service.server import Server
from testkit.gated import Gate, sessions
from testkit.servefix import drained, plain_model, running, server_config
from testkit.waiting import until

RAW = pb.OutputOptions(format=pb.RAW_UINT8)


def run(coro):
    return asyncio.run(coro)


def generate(model: str, version: int = 0, count: int = 2) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, version=version, seed_range=pb.SeedRange(count=count), output=RAW)


def loads(server, model: str, result: str = "success") -> float:
    return server.metrics.registry.get_sample_value("gan_model_loads_total", {"model": model, "result": result}) or 0


def index(response: pb.RepositoryIndexResponse) -> dict[tuple[str, int], tuple[str, str]]:
    return {(v.name, v.version): (pb.VersionState.Name(v.state), v.reason) for v in response.versions}


def corrupt(path, data: bytes = b"\x08\x07not onnx at all") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_rapid_triggers_load_each_version_once_and_leave_no_task(tmp_path):
    plain_model(tmp_path / "m" / "1" / "model.onnx")

    async def go():
        async with running(tmp_path) as (server, stub, channel):
            admin = pb_grpc.ModelAdminStub(channel)
            plain_model(tmp_path / "m" / "2" / "model.onnx")
            sighups = [server.reload() for _ in range(20)]
            results = await asyncio.gather(*sighups, admin.LoadModel(pb.LoadModelRequest(name="m", version=2)))
            counts = loads(server, "m")
            old = server.registry.status("m")[0]
            await until(lambda: drained(server))
            answer = await stub.Generate(generate("m"))
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return results, counts, old, answer.version, left

    results, counts, old, version, left = run(go())
    # Version 1 at start, version 2 once: the triggers shared the pass that loaded it (and say so).
    assert counts == 2 and set(results[:-1]) == {1}
    assert (old.version, old.state) in ((1, "UNLOADING"), (1, "AVAILABLE"))  # latest:1: version 1 left
    assert version == 2 and left == []


def test_a_version_deleted_from_disk_stops_serving(tmp_path):
    for v in (1, 2):
        plain_model(tmp_path / "m" / str(v) / "model.onnx")
    (tmp_path / "m" / "model.json").write_text('{"version_policy": "all"}')

    async def go():
        async with running(tmp_path) as (server, stub, channel):
            shutil.rmtree(tmp_path / "m" / "1")
            await server.reload()
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await stub.Generate(generate("m", version=1))
            listed = (await stub.GetModel(pb.GetModelRequest(name="m"))).versions
            other = await stub.Generate(generate("m", version=2))
            await until(lambda: drained(server))
            state = index(await pb_grpc.ModelAdminStub(channel).RepositoryIndex(pb.RepositoryIndexRequest()))
            return gone.value, list(listed), other.version, state

    gone, listed, version, state = run(go())
    assert gone.code() == grpc.StatusCode.NOT_FOUND and "has no version 1 (versions: [2])" in gone.details()
    assert listed == [2] and version == 2 and state == {("m", 2): ("VERSION_STATE_READY", "")}


def test_a_rollback_serves_the_leaving_version_until_the_one_before_it_is_ready(tmp_path):
    """latest:1 serving v2; UnloadModel(v2) rolls back to v1. While v1 loads (held here), v2 still answers: the
    model is never without a version (an adversarial run found 28% of the time with no successful call)."""
    for v in (1, 2):
        plain_model(tmp_path / "m" / str(v) / "model.onnx")
    gate, hold = Gate(), threading.Event()

    def factory(path, config):
        if hold.is_set() and path.parent.name == "1":
            gate.wait()  # the registry opens files on a worker thread: this holds v1's load
        return Session(path, config)

    async def go():
        async with running(tmp_path, session_factory=factory) as (server, stub, channel):
            admin = pb_grpc.ModelAdminStub(channel)
            hold.set()
            rollback = asyncio.ensure_future(admin.UnloadModel(pb.UnloadModelRequest(name="m", version=2)))
            await gate.reached()
            during = [(await stub.Generate(generate("m"))).version for _ in range(5)]
            gate.open()
            await rollback
            after = (await stub.Generate(generate("m"))).version
            return during, after, server.registry.versions("m")

    during, after, serving = run(go())
    assert during == [2] * 5 and after == 1 and serving == [1]


def test_rollbacks_and_roll_forwards_under_load_fail_no_call(tmp_path):
    """Eight callers in a closed loop while ModelAdmin rolls back (unload v2) and forward (load v2) five times."""
    for v in (1, 2):
        plain_model(tmp_path / "m" / str(v) / "model.onnx")

    async def go():
        async with running(tmp_path) as (_server, stub, channel):
            admin = pb_grpc.ModelAdminStub(channel)
            stop, outcomes = asyncio.Event(), []

            async def caller() -> None:
                while not stop.is_set():
                    try:
                        outcomes.append((await stub.Generate(generate("m"))).version)
                    except grpc.aio.AioRpcError as e:
                        outcomes.append(e.code())

            callers = [asyncio.ensure_future(caller()) for _ in range(8)]
            for _ in range(5):
                await admin.UnloadModel(pb.UnloadModelRequest(name="m", version=2))
                await admin.LoadModel(pb.LoadModelRequest(name="m", version=2))
            stop.set()
            await asyncio.gather(*callers)
            return outcomes

    outcomes = run(go())
    assert set(outcomes) == {1, 2}, {o for o in outcomes if o not in (1, 2)}


def test_a_corrupt_version_is_rejected_once_and_the_old_one_keeps_serving(tmp_path, caplog):
    plain_model(tmp_path / "m" / "1" / "model.onnx")

    async def go():
        async with running(tmp_path) as (server, stub, channel):
            corrupt(tmp_path / "m" / "2" / "model.onnx")
            for _ in range(3):
                await server.reload()
            answer = await stub.Generate(generate("m"))
            state = index(await pb_grpc.ModelAdminStub(channel).RepositoryIndex(pb.RepositoryIndexRequest()))
            failures = loads(server, "m", "failure")
            # Once the file changes (the copy finished), it is tried again, and then it replaces version 1.
            plain_model(tmp_path / "m" / "2" / "model.onnx")
            await server.reload()
            later = await stub.Generate(generate("m"))
            return answer.version, state, failures, later.version

    with caplog.at_level(logging.ERROR):
        version, state, failures, later = run(go())
    assert version == 1 and failures == 1 and later == 2
    assert state[("m", 1)] == ("VERSION_STATE_READY", "")
    assert state[("m", 2)][0] == "VERSION_STATE_FAILED" and state[("m", 2)][1]
    assert caplog.text.count("model m version 2 failed to load") == 1


def test_the_last_ready_version_survives_a_failed_replacement_even_at_start(tmp_path):
    plain_model(tmp_path / "m" / "1" / "model.onnx")
    corrupt(tmp_path / "m" / "2" / "model.onnx")

    async def go():
        async with running(tmp_path) as (_server, stub, _ch):
            return (await stub.Generate(generate("m"))).version

    assert run(go()) == 1  # latest:1 means the latest that loads


def test_unload_and_load_through_the_admin_api_and_health_follows(tmp_path):
    for v in (1, 2):
        plain_model(tmp_path / "m" / str(v) / "model.onnx")

    async def go():
        async with running(tmp_path) as (server, stub, channel):
            admin, health = pb_grpc.ModelAdminStub(channel), health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                status = (await health.Check(health_pb2.HealthCheckRequest())).status
                return status == health_pb2.HealthCheckResponse.SERVING

            async def becomes_serving() -> bool:  # the health update is a task of its own: watch for it
                async for answer in health.Watch(health_pb2.HealthCheckRequest(), timeout=10):
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                return False

            steps = [await serving()]
            await admin.UnloadModel(pb.UnloadModelRequest(name="m"))
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await stub.Generate(generate("m"))
            steps.append(await serving())
            unloaded = index(await admin.RepositoryIndex(pb.RepositoryIndexRequest()))
            await server.reload()  # a rescan does not bring back what UnloadModel took away
            steps.append(bool(server.registry.models))
            status = await admin.LoadModel(pb.LoadModelRequest(name="m", version=1))  # and pinned beside latest:1
            steps.append(await becomes_serving())
            versions = list((await stub.GetModel(pb.GetModelRequest(name="m"))).versions)
            info = server.metrics.registry.get_sample_value
            gauge = [info("gan_model_info", {"model": "m", "version": v, "provider": "CPUExecutionProvider"})
                     for v in ("1", "2")]  # fmt: skip
            return steps, gone.value.code(), unloaded, status, versions, gauge

    steps, code, unloaded, status, versions, gauge = run(go())
    assert steps == [True, False, False, True] and code == grpc.StatusCode.NOT_FOUND
    assert {s for s, _ in unloaded.values()} == {"VERSION_STATE_AVAILABLE"}
    assert {r for _, r in unloaded.values()} == {"unloaded by UnloadModel"}
    assert [(v.version, pb.VersionState.Name(v.state)) for v in status.versions] == [
        (1, "VERSION_STATE_READY"), (2, "VERSION_STATE_READY")]  # fmt: skip
    assert versions == [1, 2] and gauge == [1, 1]


def test_admin_errors_name_the_field(tmp_path):
    plain_model(tmp_path / "m" / "1" / "model.onnx")
    corrupt(tmp_path / "bad" / "1" / "model.onnx")

    async def go():
        async with running(tmp_path) as (_server, _stub, channel):
            admin = pb_grpc.ModelAdminStub(channel)
            calls = [
                (admin.LoadModel(pb.LoadModelRequest(name="nope")), grpc.StatusCode.NOT_FOUND, "name: no model 'nope'"),
                (admin.LoadModel(pb.LoadModelRequest(name="../m")), grpc.StatusCode.INVALID_ARGUMENT, "name: '../m' is not"),
                (admin.LoadModel(pb.LoadModelRequest(name="m", version=9)), grpc.StatusCode.NOT_FOUND, "version: model 'm' has no version 9"),
                (admin.LoadModel(pb.LoadModelRequest(name="bad")), grpc.StatusCode.FAILED_PRECONDITION, "name: model 'bad' version 1 failed"),
                (admin.UnloadModel(pb.UnloadModelRequest(name="m", version=3)), grpc.StatusCode.NOT_FOUND, "version: model 'm' has no version 3"),
                (admin.UnloadModel(pb.UnloadModelRequest(name="zzz")), grpc.StatusCode.NOT_FOUND, "name: model 'zzz' is not loaded"),
            ]  # fmt: skip
            out = []
            for call, code, text in calls:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                out.append((e.value.code(), e.value.details(), code, text))
            return out

    for got, details, code, text in run(go()):
        assert got == code and details.startswith(text), details


def test_explicit_mode_loads_only_what_is_asked(tmp_path):
    for name in ("a", "b"):
        plain_model(tmp_path / name / "1" / "model.onnx")

    async def go():
        async with running(tmp_path, model_control="explicit", load_model=("a",)) as (_server, _stub, channel):
            admin = pb_grpc.ModelAdminStub(channel)
            before = index(await admin.RepositoryIndex(pb.RepositoryIndexRequest()))
            await admin.LoadModel(pb.LoadModelRequest(name="b"))
            ready = index(await admin.RepositoryIndex(pb.RepositoryIndexRequest(ready_only=True)))
            return before, ready

    before, ready = run(go())
    assert before[("a", 1)] == ("VERSION_STATE_READY", "")
    assert before[("b", 1)][0] == "VERSION_STATE_AVAILABLE" and "explicit model control" in before[("b", 1)][1]
    assert set(ready) == {("a", 1), ("b", 1)}


def test_poll_mode_picks_up_a_new_version_and_a_policy_change(tmp_path):
    plain_model(tmp_path / "m" / "1" / "model.onnx")

    async def go():
        async with running(tmp_path, model_control="poll", poll_seconds=0.2) as (server, _stub, _ch):
            plain_model(tmp_path / "m" / "2" / "model.onnx")
            await until(lambda: server.registry.versions("m") == [2], timeout=10)
            (tmp_path / "m" / "model.json").write_text('{"version_policy": "specific:1"}')
            # ...and version 2 has finished leaving, so that its state is the policy's verdict, not its drain.
            left = lambda: [s.state for s in server.registry.status("m")] == ["READY", "AVAILABLE"]  # noqa: E731
            await until(lambda: server.registry.versions("m") == [1] and left(), timeout=10)
            (tmp_path / "m" / "model.json").write_text('{"version_policy": "newest"}')  # refused: nothing changes
            await server.reload()
            return server.registry.versions("m"), server.registry.status("m")

    versions, status = run(go())
    assert versions == [1]
    assert status[1].state == "FAILED" and status[1].reason.startswith("m/model.json: version_policy: expected")


def test_unloading_a_version_lets_its_requests_finish(tmp_path):
    plain_model(tmp_path / "m" / "1" / "model.onnx")
    plain_model(tmp_path / "m" / "2" / "model.onnx")
    (tmp_path / "m" / "model.json").write_text('{"version_policy": "all"}')
    gate = Gate()  # version 1's runs wait here

    async def go():
        factory = sessions({"m/1": gate.wait})
        async with running(tmp_path, session_factory=factory, max_batch_size=4) as (server, stub, channel):
            slow = asyncio.ensure_future(stub.Generate(generate("m", version=1, count=8)))
            await gate.reached()  # in flight: its batch is inside the model
            session = weakref.ref(server.registry.get("m", 1).session)
            await pb_grpc.ModelAdminStub(channel).UnloadModel(pb.UnloadModelRequest(name="m", version=1))
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await stub.Generate(generate("m", version=1))
            states = [s.state for s in server.registry.status("m")]
            other = await stub.Generate(generate("m", version=2))
            held = session() is not None  # while its request runs
            gate.open()
            finished = await slow
            await until(lambda: drained(server))
            gc.collect()
            return gone.value, states, other.version, len(finished.images), held, session()

    gone, states, other, images, held, session = run(go())
    assert gone.code() == grpc.StatusCode.NOT_FOUND and "(versions: [2])" in gone.details()
    assert states == ["UNLOADING", "READY"] and other == 2 and images == 8
    assert held and session is None  # then freed: nothing keeps a version that left


def test_a_stop_during_a_load_abandons_it_and_leaves_nothing_running(tmp_path):
    plain_model(tmp_path / "m" / "1" / "model.onnx")
    gate = Gate()

    def slow_load(path, config):  # version 2's load lasts until the test opens the gate
        if path.parent.name == "2":
            gate.wait()
        return Session(path, config)

    async def go():
        async with running(tmp_path, session_factory=slow_load) as (server, _stub, _ch):
            plain_model(tmp_path / "m" / "2" / "model.onnx")
            reload = asyncio.ensure_future(server.reload())
            await gate.reached()
            states = [(s.version, s.state) for s in server.registry.status("m")]
            # The registry's part of a server's stop, while the load is under way: the gate opens only once the
            # stop has begun (it runs up to its wait for the load before the loop reaches the callback).
            asyncio.get_running_loop().call_soon(gate.open)
            await server.registry.stop()
            outcome = await asyncio.gather(reload, return_exceptions=True)
            models = server.registry.models
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return states, outcome, models, left

    states, outcome, models, left = run(go())
    assert states == [(1, "READY"), (2, "LOADING")]
    assert outcome == [0] and models == {} and left == []  # version 2 finished loading after the stop: never joined


def test_a_full_queue_answers_before_any_latent_is_built(tmp_path):
    plain_model(tmp_path / "m" / "1" / "model.onnx")
    gate, pool_free = Gate(), threading.Event()

    async def go():
        flags = dict(max_batch_size=1024, preferred_batch_size=1024, max_queue=1024, batch_workers=1, encoder_threads=1)
        async with running(tmp_path, session_factory=sessions(m=gate.wait), **flags) as (server, stub, _ch):
            batcher = server.registry.get("m").batcher
            first = asyncio.ensure_future(stub.Generate(generate("m", count=1024)))
            await gate.reached()  # taken, its run waits behind the gate
            second = asyncio.ensure_future(stub.Generate(generate("m", count=1024)))
            await until(lambda: batcher.queue_depth == 1024)  # the queue is full
            busy = server.encoder.submit(pool_free.wait, 60)  # PNG work of other callers holds the encoder pool
            request = pb.GenerateRequest(model="m", seeds=pb.SeedList(seeds=range(1024)), output=RAW)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await stub.Generate(request, timeout=30)  # had it waited for the pool: DEADLINE_EXCEEDED
            held = not pool_free.is_set()  # answered while the pool was still held
            still_queued = batcher.queue_depth
            pool_free.set()
            gate.open()
            await asyncio.gather(first, second, asyncio.wrap_future(busy))
            return full.value, held, still_queued

    full, held, still_queued = run(go())
    # Refused before its 1,024 seeds went to the busy encoder pool, which stayed busy until after the answer.
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "batch queue is full" in full.details()
    assert held and still_queued == 1024


def test_bodies_that_do_not_parse_get_invalid_argument_and_are_counted(tmp_path, caplog):
    plain_model(tmp_path / "m" / "1" / "model.onnx")

    async def go():
        async with running(tmp_path) as (server, _stub, channel):
            codes = []
            for body in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x1a\x80\x80\x80\x80\x10"):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await channel.unary_unary("/ganserve.v1.Generator/Generate")(body, timeout=5)
                codes.append((e.value.code(), e.value.details()))
            counted = server.metrics.registry.get_sample_value(
                "gan_requests_total", {"method": "Generate", "model": "unknown", "code": "INVALID_ARGUMENT"}
            )
            return codes, counted

    with caplog.at_level(logging.WARNING):
        codes, counted = run(go())
    assert (
        codes
        == [(grpc.StatusCode.INVALID_ARGUMENT, "request: the body is not a valid ganserve.v1.GenerateRequest")] * 3
    )
    assert counted == 3 and "Traceback" not in caplog.text


def test_the_response_bound_counts_latents(tmp_path):
    plain_model(tmp_path / "m" / "1" / "model.onnx", shape=(1, 16, 16))

    async def go():
        async with running(tmp_path, max_message_bytes=1 << 20) as (_server, stub, _ch):
            output = pb.OutputOptions(format=pb.RAW_UINT8, return_latents=True)
            request = pb.GenerateRequest(model="m", seed_range=pb.SeedRange(count=1000), output=output)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Generate(request)
            fits = await stub.Generate(pb.GenerateRequest(model="m", seed_range=pb.SeedRange(count=700), output=output))
            return e.value, len(fits.latents)

    error, latents = run(go())
    # 1,000 × (256 image bytes + 1,024 latent bytes) is over 1 MiB; 700 is under it, and arrives whole.
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("latents: 1000 images")
    assert latents == 700 * 256


def test_a_call_after_sigterm_gets_unavailable_while_accepted_ones_finish(tmp_path):
    plain_model(tmp_path / "m" / "1" / "model.onnx")
    gate = Gate()

    async def go():
        async with running(tmp_path, session_factory=sessions(m=gate.wait), max_batch_size=4) as (
            server,
            stub,
            channel,
        ):
            slow = asyncio.ensure_future(stub.Generate(generate("m", count=8)))
            await gate.reached()  # accepted, and running: held inside the model until the test opens the gate
            stopping = asyncio.ensure_future(server.stop(grace=20))
            await until(lambda: server.gate.draining)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.Generate(generate("m"))
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            gate.open()
            finished = await slow
            await stopping
            return late.value, health.status, len(finished.images)

    late, health, images = run(go())
    assert late.code() == grpc.StatusCode.UNAVAILABLE and late.details() == "server: shutting down"
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING and images == 8


def test_unloading_the_newest_under_latest_serves_the_one_before(tmp_path):
    for v in (1, 2):
        plain_model(tmp_path / "m" / str(v) / "model.onnx")

    async def go():
        async with running(tmp_path) as (server, stub, channel):
            await pb_grpc.ModelAdminStub(channel).UnloadModel(pb.UnloadModelRequest(name="m", version=2))
            return server.registry.versions("m"), (await stub.Generate(generate("m"))).version

    assert run(go()) == ([1], 1)


def test_a_request_that_never_ends_holds_a_leaving_version_for_the_grace_period_only(tmp_path):
    for v in (1, 2):
        plain_model(tmp_path / "m" / str(v) / "model.onnx")

    async def go():
        async with running(tmp_path, grace_seconds=0.3, version_policy="all") as (server, _stub, channel):
            with server.registry.use("m", 1) as held:  # a stream whose client stopped reading
                await pb_grpc.ModelAdminStub(channel).UnloadModel(pb.UnloadModelRequest(name="m", version=1))
                await until(lambda: drained(server), timeout=5)
                return held.batcher.accepting

    assert run(go()) is False  # its batcher stopped; the version is gone although a request still holds it


def test_the_admin_api_is_off_on_an_open_port_without_tokens_unless_asked(tmp_path):
    plain_model(tmp_path / "m" / "1" / "model.onnx")

    async def index_code(**flags) -> tuple[grpc.StatusCode, str]:
        server = Server(server_config(tmp_path, host="0.0.0.0", http_port=-1, **flags))
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                await pb_grpc.ModelAdminStub(channel).RepositoryIndex(pb.RepositoryIndexRequest())
                return grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        finally:
            await server.stop(grace=1)

    async def go():
        return await index_code(), await index_code(admin_api="on"), await index_code(admin_api="off")

    (off, why), (on, _), (asked_off, said) = run(go())
    assert (off, on, asked_off) == (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED)
    # A call to it says why it is off and how to turn it on, not gRPC's bare "Method not found!".
    assert why.startswith("ganserve.v1.ModelAdmin is off on this server: no tokens, and --host 0.0.0.0")
    assert "--admin-api on" in why and said.endswith("--admin-api off")
