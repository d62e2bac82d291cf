"""The gRPC service end to end: a real in-process server on port 0 over real (tiny) ONNX models."""

from __future__ import annotations

import asyncio
import math
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service import contract
from service import domain as dp
from service.api.ganserve.v1 import generator_pb2 as pb
from service.errors import InvalidArgument
from testkit.gated import Gate, sessions
from testkit.servefix import ECHO_CLASSES, echo_model, plain_model, running
from testkit.waiting import until


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    echo_model(root / "echo" / "1" / "model.onnx")
    plain_model(root / "plain" / "1" / "model.onnx")
    plain_model(root / "plain" / "2" / "model.onnx")
    (root / "plain" / "model.json").write_text('{"version_policy": "all"}')  # both versions serve
    return root


def run(coro):
    return asyncio.run(coro)


def floats(resp: pb.GenerateResponse) -> np.ndarray:
    """RAW_FLOAT32 images → [n, C, H, W]."""
    return np.stack([np.frombuffer(b, "<f4").reshape(resp.image_shape) for b in resp.images])


RAW = pb.OutputOptions(format=pb.RAW_FLOAT32)


def test_list_and_get_models(repo):
    async def go():
        async with running(repo) as (_, stub, _ch):
            models = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
            assert set(models) == {"echo", "plain"}
            echo = models["echo"]
            assert (echo.latent_dim, echo.prior, list(echo.class_names)) == (5, "normal", list(ECHO_CLASSES))
            assert list(echo.image_shape) == [1, 2, 4] and (echo.output_min, echo.output_max) == (-1, 1)
            assert echo.provider == "CPUExecutionProvider" and echo.ready
            assert list(models["plain"].versions) == [1, 2] and models["plain"].version == 2
            one = await stub.GetModel(pb.GetModelRequest(name="plain", version=1))
            assert one.version == 1 and one.metadata["latent_dim"] == "8"

    run(go())


def test_seeds_follow_the_documented_contract_and_repeat_across_servers(repo):
    request = pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[7, 0, 2**40]), output=RAW)

    async def once():
        async with running(repo) as (_, stub, _ch):
            return await stub.Generate(request)

    a, b = run(once()), run(once())
    assert a.images == b.images  # identical bytes from two separate server instances
    expected = np.clip(contract.seed_latents([7, 0, 2**40], 8, "normal"), -1, 1)
    assert np.array_equal(floats(a).reshape(3, 8), expected)
    # A seed's sample does not depend on the rest of the batch.
    single = run(_generate(repo, pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[0]), output=RAW)))
    assert single.images[0] == a.images[1]


async def _generate(repo, request):
    async with running(repo) as (_, stub, _ch):
        return await stub.Generate(request)


def test_explicit_latents_truncation_and_returned_latents(repo):
    z = np.array([[0.5, -0.25, 0.1, 0.0, -0.9, 0.3, 0.2, 0.7], [0.2] * 8], np.float32)
    resp = run(_generate(repo, pb.GenerateRequest(
        model="plain", rows=pb.LatentRows(values=z.ravel()), truncation=0.5,
        output=pb.OutputOptions(format=pb.RAW_FLOAT32, return_latents=True),
    )))  # fmt: skip
    assert np.allclose(floats(resp).reshape(2, 8), 0.5 * z)
    assert np.allclose(np.array(resp.latents).reshape(2, 8), 0.5 * z)


def test_labels_are_honoured_exactly(repo):
    labels = [pb.Label(index=2), pb.Label(name="dog"), pb.Label(soft=pb.SoftLabel(weights=[1, 0, 3]))]
    resp = run(_generate(repo, pb.GenerateRequest(
        model="echo", seeds=pb.SeedList(seeds=[1, 2, 3]), labels=labels, output=RAW,
    )))  # fmt: skip
    y = floats(resp).reshape(3, 8)[:, 5:]
    assert np.allclose(y, [[0, 0, 1], [0, 1, 0], [0.25, 0, 0.75]])
    one_for_all = run(_generate(repo, pb.GenerateRequest(
        model="echo", seed_range=pb.SeedRange(start=5, count=4), labels=[pb.Label(name="eel")], output=RAW,
    )))  # fmt: skip
    assert np.allclose(floats(one_for_all).reshape(4, 8)[:, 5:], [[0, 0, 1]] * 4)


def test_png_uint8_and_grid_outputs(repo):
    from io import BytesIO

    from PIL import Image

    request = pb.GenerateRequest(model="plain", seed_range=pb.SeedRange(start=0, count=6))
    png = run(_generate(repo, request))
    assert png.format == pb.PNG and all(b.startswith(b"\x89PNG") for b in png.images)
    request.output.format = pb.RAW_UINT8
    request.output.grid = True
    request.output.grid_columns = 3
    raw = run(_generate(repo, request))
    assert list(raw.image_shape) == [2, 4, 1] and len(raw.images[0]) == 8
    for p, r in zip(png.images, raw.images, strict=True):
        assert np.array_equal(np.asarray(Image.open(BytesIO(p))).ravel(), np.frombuffer(r, np.uint8))
    grid = Image.open(BytesIO(raw.grid_png))
    assert grid.size == (3 * 6 + 2, 2 * 4 + 2)


def test_interpolation_hits_keyframes_and_keeps_the_norm(repo):
    a = np.array([0.6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)
    b = np.array([0.0, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)
    keys = [pb.Keyframe(row=pb.LatentRows(values=a)), pb.Keyframe(row=pb.LatentRows(values=b))]
    resp = run(_interpolate(repo, pb.InterpolateRequest(model="plain", keyframes=keys, steps=4, output=RAW)))
    frames = floats(resp).reshape(-1, 8)
    assert len(frames) == 5 and np.allclose(frames[0], a) and np.allclose(frames[-1], b)
    assert np.allclose(np.linalg.norm(frames, axis=1), 0.6, atol=1e-6)  # slerp: equal-norm keys keep the norm
    assert np.allclose(frames[2], 0.6 * np.array([math.sqrt(0.5), math.sqrt(0.5), 0, 0, 0, 0, 0, 0]), atol=1e-6)
    resp = run(
        _interpolate(repo, pb.InterpolateRequest(model="plain", keyframes=keys, steps=4, method=pb.LERP, output=RAW))
    )
    assert np.allclose(floats(resp).reshape(-1, 8)[2], (a + b) / 2)


async def _interpolate(repo, request):
    async with running(repo) as (_, stub, _ch):
        return await stub.Interpolate(request)


def test_conditional_interpolation_blends_labels(repo):
    keys = [pb.Keyframe(seed=1, label=pb.Label(name="cat")), pb.Keyframe(seed=2, label=pb.Label(name="eel"))]
    resp = run(_interpolate(repo, pb.InterpolateRequest(model="echo", keyframes=keys, steps=2, output=RAW)))
    y = floats(resp).reshape(-1, 8)[:, 5:]
    assert np.allclose(y, [[1, 0, 0], [0.5, 0, 0.5], [0, 0, 1]])


def test_streaming_thousands_of_images_under_a_small_message_limit(repo):
    async def go():
        # 6,000 float images are ~190 kB; the limit is 64 kB per message, so only chunking gets them through.
        async with running(repo, max_message_bytes=64 << 10, stream_chunk=500) as (_, stub, _ch):
            request = pb.GenerateRequest(model="plain", seed_range=pb.SeedRange(start=0, count=6000), output=RAW)
            offsets, sizes, images = [], [], []
            async for part in stub.GenerateStream(request):
                offsets.append(part.offset)
                sizes.append(part.ByteSize())
                images.extend(part.images)
            return offsets, sizes, images

    offsets, sizes, images = run(go())
    assert len(images) == 6000 and offsets[0] == 0 and len(offsets) > 1
    assert offsets == sorted(offsets) and max(sizes) <= 64 << 10  # chunks sized to the limit, in order
    expected = np.clip(contract.seed_latents([4321], 8, "normal"), -1, 1)
    assert np.array_equal(np.frombuffer(images[4321], "<f4"), expected.ravel())


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (pb.GenerateRequest(model="nope", seeds=pb.SeedList(seeds=[1])), grpc.StatusCode.NOT_FOUND, "model"),
        (pb.GenerateRequest(model="plain", version=9, seeds=pb.SeedList(seeds=[1])), grpc.StatusCode.NOT_FOUND, "version"),
        (pb.GenerateRequest(seeds=pb.SeedList(seeds=[1])), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (pb.GenerateRequest(model="plain"), grpc.StatusCode.INVALID_ARGUMENT, "latents"),
        (pb.GenerateRequest(model="plain", rows=pb.LatentRows(values=[0.1] * 7)), grpc.StatusCode.INVALID_ARGUMENT, "rows.values"),
        (pb.GenerateRequest(model="plain", rows=pb.LatentRows(values=[0.1] * 7 + [float("nan")])), grpc.StatusCode.INVALID_ARGUMENT, "rows.values"),
        (pb.GenerateRequest(model="plain", rows=pb.LatentRows(values=[float("inf")] * 8)), grpc.StatusCode.INVALID_ARGUMENT, "rows.values"),
        (pb.GenerateRequest(model="plain", seed_range=pb.SeedRange(count=5000)), grpc.StatusCode.INVALID_ARGUMENT, "seed_range.count"),
        (pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=range(1025))), grpc.StatusCode.INVALID_ARGUMENT, "seeds.seeds"),
        (pb.GenerateRequest(model="plain", seeds=pb.SeedList()), grpc.StatusCode.INVALID_ARGUMENT, "seeds.seeds"),
        (pb.GenerateRequest(model="plain", seed_range=pb.SeedRange(start=2**64 - 2, count=5)), grpc.StatusCode.INVALID_ARGUMENT, "seed_range.start"),
        (pb.GenerateRequest(model="echo", seeds=pb.SeedList(seeds=[1]), labels=[pb.Label(index=0)] * 1025), grpc.StatusCode.INVALID_ARGUMENT, "labels"),
        (pb.GenerateRequest(model="x" * 10_000, seeds=pb.SeedList(seeds=[1])), grpc.StatusCode.NOT_FOUND, "model"),
        (pb.GenerateRequest(model="plain", seed_range=pb.SeedRange(count=0)), grpc.StatusCode.INVALID_ARGUMENT, "seed_range.count"),
        (pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[1]), truncation=1.5), grpc.StatusCode.INVALID_ARGUMENT, "truncation"),
        (pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[1]), labels=[pb.Label(index=0)]), grpc.StatusCode.INVALID_ARGUMENT, "labels"),
        (pb.GenerateRequest(model="echo", seeds=pb.SeedList(seeds=[1])), grpc.StatusCode.INVALID_ARGUMENT, "labels"),
        (pb.GenerateRequest(model="echo", seeds=pb.SeedList(seeds=[1]), labels=[pb.Label(index=3)]), grpc.StatusCode.INVALID_ARGUMENT, "labels[0].index"),
        (pb.GenerateRequest(model="echo", seeds=pb.SeedList(seeds=[1]), labels=[pb.Label(name="emu")]), grpc.StatusCode.INVALID_ARGUMENT, "labels[0].name"),
        (pb.GenerateRequest(model="echo", seeds=pb.SeedList(seeds=[1]), labels=[pb.Label(soft=pb.SoftLabel(weights=[1, 2]))]), grpc.StatusCode.INVALID_ARGUMENT, "labels[0].soft"),
        (pb.GenerateRequest(model="echo", seeds=pb.SeedList(seeds=[1, 2, 3]), labels=[pb.Label(index=0)] * 2), grpc.StatusCode.INVALID_ARGUMENT, "labels"),
        (pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[1]), output=pb.OutputOptions(format=9)), grpc.StatusCode.INVALID_ARGUMENT, "output.format"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_status_and_a_message_naming_the_field(repo, request_, code, field):
    async def go():
        async with running(repo, max_images=1024) as (_, stub, _ch):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request_)
            # The server keeps serving after the error.
            ok = await stub.Generate(pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[1])))
            return err.value, ok

    err, ok = run(go())
    assert err.code() == code
    assert err.details().startswith(f"{field}:") and "Traceback" not in err.details()
    assert len(ok.images) == 1


def test_interpolate_errors(repo):
    async def go():
        async with running(repo) as (_, stub, _ch):
            cases = [
                (pb.InterpolateRequest(model="plain", keyframes=[pb.Keyframe(seed=1)], steps=3), "keyframes"),
                (pb.InterpolateRequest(model="plain", keyframes=[pb.Keyframe(seed=1)] * 2, steps=0), "steps"),
                (pb.InterpolateRequest(model="plain", keyframes=[pb.Keyframe(seed=1)] * 2, steps=2000), "steps"),
                (pb.InterpolateRequest(model="echo", keyframes=[pb.Keyframe(seed=1)] * 2, steps=2), "keyframes"),
                (pb.InterpolateRequest(model="plain", keyframes=[pb.Keyframe(seed=1), pb.Keyframe()], steps=2), "keyframes[1]"),
            ]  # fmt: skip
            out = []
            for request, field in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Interpolate(request)
                out.append((err.value.code(), err.value.details(), field))
            return out

    for code, details, field in run(go()):
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}:"), details


def test_full_queue_deadline_and_cancellation(tmp_path):
    plain_model(tmp_path / "slow" / "1" / "model.onnx")
    gate = Gate()  # the model's runs wait here: the only worker stays busy until the test says

    async def go():
        flags = dict(max_queue=4, max_images=4, max_batch_size=4, max_delay_ms=0, batch_workers=1)
        async with running(tmp_path, session_factory=sessions(slow=gate.wait), **flags) as (server, stub, _ch):
            mv = server.registry.get("slow")
            slow = pb.GenerateRequest(model="slow", seed_range=pb.SeedRange(start=0, count=4))
            busy = asyncio.ensure_future(stub.Generate(slow))  # occupies the only worker
            await gate.reached()
            queued = asyncio.ensure_future(stub.Generate(slow))
            await until(lambda: mv.batcher.queue_depth == 4)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await stub.Generate(slow)  # the queue holds 4 samples: no room for 4 more
            queued.cancel()  # a cancelled call leaves the queue at once, while the worker is still held
            await until(lambda: mv.batcher.queue_depth == 0)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.Generate(slow, timeout=0.05)  # expires while queued behind the held worker
            await until(lambda: mv.batcher.queue_depth == 0)
            still_busy = not busy.done()
            gate.open()
            await busy
            return full.value, late.value, still_busy, gate.arrived

    full, late, still_busy, runs = run(go())
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in full.details()
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert still_busy and runs == 1  # neither the cancelled nor the expired request ever ran


def test_metrics_are_scraped_over_http_after_traffic(repo):
    async def go():
        async with running(repo, metrics_port=0) as (server, stub, _ch):
            await stub.Generate(pb.GenerateRequest(model="plain", seed_range=pb.SeedRange(count=3)))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Generate(pb.GenerateRequest(model="nope", seeds=pb.SeedList(seeds=[1])))
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())

    text = run(go())
    for line in (
        'gan_requests_total{code="OK",method="Generate",model="plain"} 1.0',
        'gan_requests_total{code="NOT_FOUND",method="Generate",model="unknown"} 1.0',
        'gan_images_generated_total{model="plain"} 3.0',
        'gan_batch_size_count{model="plain",version="2"} 1.0',
        'gan_batch_size_sum{model="plain",version="2"} 3.0',
        'gan_model_info{model="echo",provider="CPUExecutionProvider",version="1"} 1.0',
        'gan_queue_depth{model="plain",version="2"} 0.0',
    ):
        assert line in text, line
    for family in (
        "gan_request_duration_seconds_bucket",
        "gan_queue_wait_seconds_bucket",
        "gan_model_run_seconds_bucket",
    ):
        assert family in text


def test_health_follows_the_registry_and_reflection_lists_the_service(tmp_path):
    async def go():
        async with running(tmp_path) as (server, _stub, channel):
            health = health_pb2_grpc.HealthStub(channel)
            empty = [
                (await health.Check(health_pb2.HealthCheckRequest(service=s))).status
                for s in ("", "ganserve.v1.Generator")
            ]
            plain_model(tmp_path / "late" / "1" / "model.onnx")
            assert await server.reload() == 1
            loaded = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = [s.name async for r in responses for s in r.list_services_response.service]
            return empty, loaded, names

    empty, loaded, names = run(go())
    assert empty == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
    assert loaded == health_pb2.HealthCheckResponse.SERVING
    assert "ganserve.v1.Generator" in names and "grpc.health.v1.Health" in names


def test_a_bad_model_is_skipped_and_counted(tmp_path, caplog):
    plain_model(tmp_path / "good" / "1" / "model.onnx")
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    echo_model(tmp_path / "liar" / "1" / "model.onnx")
    import onnx

    liar = onnx.load(str(tmp_path / "liar" / "1" / "model.onnx"))
    for p in liar.metadata_props:
        if p.key == "latent_dim":
            p.value = "6"
    # Without its directions, which would be refused first (5 values for a latent_dim of 6): the graph is the lie.
    props = [p for p in liar.metadata_props if p.key != "directions"]
    del liar.metadata_props[:]
    liar.metadata_props.extend(props)
    onnx.save(liar, str(tmp_path / "liar" / "1" / "model.onnx"))

    async def go():
        async with running(tmp_path) as (server, stub, _ch):
            names = [m.name for m in (await stub.ListModels(pb.ListModelsRequest())).models]
            samples = server.metrics.registry.get_sample_value
            failures = {
                n: samples("gan_model_loads_total", {"model": n, "result": "failure"}) for n in ("broken", "liar")
            }
            return names, failures

    with caplog.at_level("ERROR"):
        names, failures = run(go())
    assert names == ["good"] and failures == {"broken": 1, "liar": 1}
    assert "model liar version 1 failed to load" in caplog.text and "input z" in caplog.text


def test_more_error_paths(repo):
    async def go():
        async with running(repo, max_message_bytes=4096) as (_, stub, _ch):
            calls = [
                (stub.GetModel(pb.GetModelRequest(name="nope")), grpc.StatusCode.NOT_FOUND, "name"),
                (stub.Interpolate(pb.InterpolateRequest(model="plain", version=7, keyframes=[pb.Keyframe(seed=1)] * 2, steps=2)),
                 grpc.StatusCode.NOT_FOUND, "version"),
                (stub.Interpolate(pb.InterpolateRequest(
                    model="plain", steps=2,
                    keyframes=[pb.Keyframe(seed=1), pb.Keyframe(row=pb.LatentRows(values=[float("nan")] * 8))])),
                 grpc.StatusCode.INVALID_ARGUMENT, "keyframes[1].row.values"),
                # 200 float images of 32 bytes do not fit a 4 kB message: Generate says so and names the way out.
                (stub.Generate(pb.GenerateRequest(model="plain", seed_range=pb.SeedRange(count=200), output=RAW)),
                 grpc.StatusCode.INVALID_ARGUMENT, "latents"),
            ]  # fmt: skip
            out = []
            for call, code, field in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                out.append((err.value, code, field))
            request = pb.GenerateRequest(
                model="plain", seeds=pb.SeedList(seeds=[1]), output=pb.OutputOptions(grid=True)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _drain(stub.GenerateStream(request))
            out.append((err.value, grpc.StatusCode.INVALID_ARGUMENT, "output.grid"))
            # ...while the same images stream through in chunks that fit.
            request = pb.GenerateRequest(model="plain", seed_range=pb.SeedRange(count=200), output=RAW)
            streamed = [len(part.images) async for part in stub.GenerateStream(request)]
            return out, streamed

    out, streamed = run(go())
    for err, code, field in out:
        assert err.code() == code and err.details().startswith(f"{field}:"), err.details()
        assert len(err.details()) < 400
    assert "GenerateStream" in out[3][0].details()
    assert sum(streamed) == 200 and len(streamed) > 1


async def _drain(call) -> None:
    async for _ in call:
        pass


def test_partial_latent_row_is_named_as_such(repo):
    request = pb.GenerateRequest(model="plain", rows=pb.LatentRows(values=[0.1] * 7))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        run(_generate(repo, request))
    assert err.value.details() == "rows.values: 7 values is not a positive multiple of latent_dim 8"


def test_grid_only_reports_the_shape_of_the_format(repo):
    """RAW_FLOAT32 is [C, H, W] by the proto, grid or no grid; PNG and RAW_UINT8 are [H, W, C]."""
    shapes = {}
    for fmt in (pb.RAW_FLOAT32, pb.RAW_UINT8, pb.PNG):
        output = pb.OutputOptions(format=fmt, grid=True, grid_only=True)
        resp = run(_generate(repo, pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[1, 2]), output=output)))
        assert not resp.images and resp.grid_png.startswith(b"\x89PNG")
        shapes[fmt] = list(resp.image_shape)
    assert shapes == {pb.RAW_FLOAT32: [1, 2, 4], pb.RAW_UINT8: [2, 4, 1], pb.PNG: [2, 4, 1]}


NOISE = {"noise32": (3, 32, 32), "noise64": (3, 64, 64), "gray28": (1, 28, 28)}
SIZE_CASES = [
    ("noise32", 16, pb.OutputOptions(format=pb.PNG, grid=True)),
    ("noise32", 9, pb.OutputOptions(format=pb.RAW_UINT8, grid=True, grid_columns=2)),
    ("noise64", 8, pb.OutputOptions(format=pb.PNG, grid=True, grid_only=True)),
    ("noise64", 4, pb.OutputOptions(format=pb.PNG)),
    ("gray28", 30, pb.OutputOptions(format=pb.RAW_FLOAT32, return_latents=True)),
    ("gray28", 12, pb.OutputOptions(format=pb.PNG, grid=True, return_latents=True)),
]


def test_a_response_that_would_not_fit_is_refused_before_the_work(tmp_path):
    """With the limit one byte under a response's real size, Generate says so up front (INVALID_ARGUMENT naming
    `latents`), rather than doing the work and failing the send (RESOURCE_EXHAUSTED). The images are
    incompressible noise, PNG's worst case; grids add padding, PNG adds a filter byte per row."""
    for name, shape in NOISE.items():
        plain_model(tmp_path / name / "1" / "model.onnx", shape=shape, prior="uniform", gain=1 / math.sqrt(3))

    def request(name, n, output):
        return pb.GenerateRequest(model=name, seed_range=pb.SeedRange(start=0, count=n), output=output)

    async def sizes():
        async with running(tmp_path) as (_, stub, _ch):
            return [(await stub.Generate(request(*case))).ByteSize() for case in SIZE_CASES]

    async def under(limit, case):
        async with running(tmp_path, max_message_bytes=limit) as (_, stub, _ch):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request(*case))
            return err.value

    for case, size in zip(SIZE_CASES, run(sizes()), strict=True):
        err = run(under(size - 1, case))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("latents:"), (case, size)


def test_a_failed_stream_leaves_no_task_behind(repo):
    """When a chunk fails, the chunk in flight beside it is collected before the error leaves the stream."""
    release = threading.Event()

    def model(feeds):
        if len(feeds["z"]) == 2 and feeds["z"][0, 0] != 0:  # the second chunk: still running when the first fails
            release.wait(5)
        raise RuntimeError("device lost")

    flags = dict(stream_chunk=2, max_batch_size=2, max_delay_ms=0)

    async def go():
        async with running(repo, session_factory=sessions(plain=model), **flags) as (server, _stub, _ch):
            request = dp.Generate("plain", latents=dp.Rows(np.arange(32, dtype=np.float32) / 64))
            with pytest.raises(RuntimeError, match="device lost"):
                async for _ in server.plane.stream(request):
                    pass
            left = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "DataPlane._run"]
            release.set()
            return left

    assert run(go()) == []


def test_a_failed_reload_is_logged_not_lost(repo, caplog):
    async def go():
        async with running(repo) as (server, _stub, _ch):

            async def broken() -> int:
                raise OSError("model repository unreadable")

            server.registry._pass = broken
            task = server.spawn(server.reload(), "SIGHUP reload")
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0)

    with caplog.at_level("ERROR"):
        run(go())
    assert "SIGHUP reload failed" in caplog.text and "model repository unreadable" in caplog.text


def test_metrics_endpoint_binds_the_host_and_carries_process_series(repo):
    async def go():
        async with running(repo, metrics_port=0) as (server, _stub, _ch):
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
            return server._metrics_server.server_address[0], text

    address, text = run(go())
    assert address == "127.0.0.1"  # the configured host, not every interface
    for series in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_gc_objects_collected_total"):
        assert series in text


def test_unknown_format_versions_and_point_generators_are_skipped_with_a_reason(tmp_path, caplog):
    import onnx

    plain_model(tmp_path / "good" / "1" / "model.onnx")
    for name, key, value in (("future", "format_version", "4"), ("points", "kind", "points")):
        path = plain_model(tmp_path / name / "1" / "model.onnx")
        model = onnx.load(str(path))
        for p in model.metadata_props:
            if p.key == key:
                p.value = value
        onnx.save(model, str(path))

    async def go():
        async with running(tmp_path) as (_, stub, _ch):
            return [m.name for m in (await stub.ListModels(pb.ListModelsRequest())).models]

    with caplog.at_level("ERROR"):
        assert run(go()) == ["good"]
    assert "format_version: '4' is not a format this reader knows" in caplog.text
    assert "model points version 1 failed to load" in caplog.text


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (dp.Generate("plain", latents=dp.Seeds([1, -1])), "seeds.seeds[1]"),
        (dp.Generate("plain", latents=dp.Seeds([2**64])), "seeds.seeds[0]"),
        (dp.Generate("plain", latents=dp.SeedRange(-1, 2)), "seed_range.start"),
        (dp.Generate("plain", latents=dp.SeedRange(0, -2)), "seed_range.count"),
        (dp.Generate("plain", latents=dp.Seeds([1]), output=dp.Output(grid=True, grid_columns=-1)), "output.grid_columns"),
        (dp.Interpolate("plain", keyframes=[dp.Keyframe(seed=1), dp.Keyframe(seed=-5)], steps=2), "keyframes[1].seed"),
        (dp.Interpolate("plain", keyframes=[dp.Keyframe(seed=1)] * 2, steps=2, method="cubic"), "method"),
    ],
)  # fmt: skip
def test_the_data_plane_checks_ranges_the_proto_types_would_have(repo, request_, field):
    """Another front end may send what uint64 fields cannot carry: the data plane refuses it naming the field."""

    async def go():
        async with running(repo) as (server, _stub, _ch):
            call = server.plane.generate if isinstance(request_, dp.Generate) else server.plane.interpolate
            with pytest.raises(InvalidArgument) as err:
                await call(request_)
            return str(err.value)

    assert run(go()).startswith(f"{field}:")


def test_a_stream_whose_single_image_cannot_fit_is_refused_up_front(repo):
    async def go():
        async with running(repo, max_message_bytes=100) as (_, stub, _ch):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _drain(stub.GenerateStream(pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[1]))))
            return err.value

    err = run(go())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("output:")
