"""Animated interpolations (issue 26): Interpolate's `animation` over gRPC and interpolation.gif/.apng/.webp over
HTTP, on the shipped conditional model. Every frame of every format equals the static frame the same request gives
without `animation`, pixel for pixel; bad options and animations over the message limit get errors naming the field."""

from __future__ import annotations

import asyncio
import io
import shutil

import aiohttp
import grpc
import numpy as np
import pytest
from PIL import Image

from service import encode
from service.api.ganserve.v1 import generator_pb2 as pb
from testkit.process import ROOT, shipped_version
from testkit.servefix import running

MODEL = "mnist-cdcgan"
FORMATS = {"gif": pb.ANIMATION_FORMAT_GIF, "apng": pb.ANIMATION_FORMAT_APNG, "webp": pb.ANIMATION_FORMAT_WEBP}
KEYS = [pb.Keyframe(seed=3, label=pb.Label(index=3)), pb.Keyframe(seed=11, label=pb.Label(index=8))]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("animation")
    version = str(shipped_version(MODEL))
    shutil.copytree(ROOT / "models" / MODEL / version, root / MODEL / version)
    return root


def request(steps: int = 8, **animation) -> pb.InterpolateRequest:
    anim = pb.AnimationOptions(**animation) if animation else None
    return pb.InterpolateRequest(model=MODEL, keyframes=KEYS, steps=steps, animation=anim,
                                 output=pb.OutputOptions(format=pb.RAW_UINT8))  # fmt: skip


def frames_of(data: bytes) -> tuple[list[np.ndarray], list[float]]:
    """Every frame of an animated image as greys, and how long each shows (ms; WebP's reader does not say)."""
    image = Image.open(io.BytesIO(data))
    frames, durations = [], []
    for i in range(image.n_frames):
        image.seek(i)
        frames.append(np.asarray(image.convert("L")))
        durations.append(image.info.get("duration"))
    return frames, durations


def collapsed(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Runs of identical frames as one: what an encoder that merges them shows, moment by moment."""
    return [f for i, f in enumerate(frames) if i == 0 or not np.array_equal(f, frames[i - 1])]


def static_frames(answer: pb.GenerateResponse) -> list[np.ndarray]:
    h, w, _ = answer.image_shape
    return [np.frombuffer(image, np.uint8).reshape(h, w) for image in answer.images]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_frame_is_the_static_frame_of_the_same_request(repo, kind):
    async def go():
        async with running(repo) as (_server, stub, _):
            still = await stub.Interpolate(request())
            moving = await stub.Interpolate(request(format=FORMATS[kind], fps=10))
            back_and_forth = await stub.Interpolate(request(format=FORMATS[kind], fps=10, ping_pong=True, loops=2))
            return still, moving, back_and_forth

    still, moving, back_and_forth = asyncio.run(go())
    expected = static_frames(still)
    assert len(expected) == 9 and moving.animation_type == f"image/{kind}" and not moving.images
    shown, durations = frames_of(moving.animation)
    assert all(a.shape == (28, 28) for a in shown)
    assert [f.tobytes() for f in collapsed(shown)] == [f.tobytes() for f in collapsed(expected)]
    if kind != "webp":  # 9 frames at 10 a second, however many identical ones were merged
        assert sum(durations) == pytest.approx(900, abs=20)
    there_and_back = expected + expected[-2:0:-1]
    shown, _ = frames_of(back_and_forth.animation)
    assert [f.tobytes() for f in collapsed(shown)] == [f.tobytes() for f in collapsed(there_and_back)]
    if kind != "webp":
        assert Image.open(io.BytesIO(back_and_forth.animation)).info["loop"] == 2


def test_the_http_route_animates_the_same_frames(repo):
    query = "from=3&to=11&from_label=3&to_label=8&steps=8"

    async def go():
        async with running(repo) as (server, stub, _), aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{server.http_port}/v1/models/{MODEL}"
            async with http.get(f"{base}/interpolation.apng?{query}&fps=10&ping_pong=1") as r:
                body, kind = await r.read(), r.content_type
            grpc_answer = await stub.Interpolate(request(format=pb.ANIMATION_FORMAT_APNG, fps=10, ping_pong=True))
            return body, kind, grpc_answer.animation

    body, kind, over_grpc = asyncio.run(go())
    assert kind == "image/apng" and body == over_grpc


BAD_GRPC = [
    ({"format": pb.ANIMATION_FORMAT_UNSPECIFIED}, "animation.format: required (formats: gif, apng, webp)"),
    ({"format": 7}, "animation.format: '7'"),
    ({"format": pb.ANIMATION_FORMAT_GIF, "fps": 0.5}, "animation.fps: from 1.0 to 50.0 frames a second (got 0.5)"),
    ({"format": pb.ANIMATION_FORMAT_GIF, "fps": 120}, "animation.fps: from 1.0 to 50.0"),
    ({"format": pb.ANIMATION_FORMAT_GIF, "fps": float("nan")}, "animation.fps: from 1.0 to 50.0"),
    ({"format": pb.ANIMATION_FORMAT_GIF, "loops": 70000}, "animation.loops: from 0 (for ever) to 65535"),
]


@pytest.mark.parametrize(("options", "message"), BAD_GRPC)
def test_bad_animation_options_name_the_field(repo, options, message):
    async def go():
        async with running(repo) as (_server, stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Interpolate(request(**options))
            return refused.value

    refused = asyncio.run(go())
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.details().startswith(message)


def test_an_animation_over_the_message_limit_says_what_to_change(repo):
    async def go():
        async with running(repo, max_message_bytes=40_000) as (_server, stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Interpolate(request(steps=200, format=pb.ANIMATION_FORMAT_GIF))
            small = await stub.Interpolate(request(steps=4, format=pb.ANIMATION_FORMAT_GIF))
            return refused.value, small

    refused, small = asyncio.run(go())
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "animation: the gif animation is" in refused.details() and "ask for fewer steps, or webp" in refused.details()
    )
    assert small.animation  # the server goes on serving


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("interpolation.gif?fps=abc", "fps:"),
        ("interpolation.gif?ping_pong=2", "ping_pong: 0, 1, true or false"),
        ("interpolation.gif?loops=-1", "loops: from 0 (for ever) to 65535"),
        ("interpolation.gif?steps=2000", "steps:"),
        ("interpolation.png?fps=10", "query: unknown parameter 'fps'"),
    ],
)
def test_bad_http_animation_queries_name_the_parameter(repo, path, message):
    async def go():
        async with running(repo) as (server, _stub, _), aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{server.http_port}/v1/models/{MODEL}/{path}&from_label=3&to_label=8"
            async with http.get(url) as r:
                return r.status, await r.json()

    status, error = asyncio.run(go())
    assert status == 400 and error["error"].startswith(message), error


def test_several_interpolations_animate_side_by_side_in_step(repo):
    second = pb.KeyframePath(keyframes=[pb.Keyframe(seed=5, label=pb.Label(index=5)),
                                        pb.Keyframe(seed=9, label=pb.Label(index=2))])  # fmt: skip
    still = request(steps=4)
    still.more_paths.append(second)
    moving = request(steps=4, format=pb.ANIMATION_FORMAT_APNG)
    moving.more_paths.append(second)
    moving.output.grid_columns = 2

    async def go():
        async with running(repo) as (_server, stub, _):
            return await stub.Interpolate(still), await stub.Interpolate(moving)

    still_answer, moving_answer = asyncio.run(go())
    frames = static_frames(still_answer)
    assert len(frames) == 10  # five of the first path, then five of the second
    expected = [encode.grid(np.stack([frames[t], frames[5 + t]])[..., None], 2)[..., 0] for t in range(5)]
    shown, _ = frames_of(moving_answer.animation)
    assert [f.tobytes() for f in collapsed(shown)] == [f.tobytes() for f in collapsed(expected)]


def test_every_path_needs_as_many_keyframes_and_all_count_against_the_limit(repo):
    uneven = request(steps=4)
    uneven.more_paths.append(pb.KeyframePath(keyframes=[*KEYS, pb.Keyframe(seed=1, label=pb.Label(index=1))]))
    many = request(steps=300)
    many.more_paths.extend([pb.KeyframePath(keyframes=KEYS)] * 3)  # 4 paths of 301 frames: over 1,024

    async def go():
        async with running(repo) as (_server, stub, _):
            refused = []
            for req in (uneven, many):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Interpolate(req)
                refused.append(e.value.details())
            return refused

    uneven_error, many_error = asyncio.run(go())
    assert uneven_error == "more_paths[0].keyframes: 3 given, as many as keyframes (2) needed"
    assert many_error == "steps: 1204 frames requested, the limit per request is 1024"


def test_the_http_route_takes_several_seeds_as_several_interpolations(repo):
    query = "from=3,5&to=11,9&from_label=3,5&to_label=8,2&steps=4"
    moving = request(steps=4, format=pb.ANIMATION_FORMAT_APNG)
    moving.more_paths.append(pb.KeyframePath(keyframes=[pb.Keyframe(seed=5, label=pb.Label(index=5)),
                                                        pb.Keyframe(seed=9, label=pb.Label(index=2))]))  # fmt: skip
    moving.output.grid_columns = 2

    async def go():
        async with running(repo) as (server, stub, _), aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{server.http_port}/v1/models/{MODEL}"
            async with http.get(f"{base}/interpolation.apng?{query}&columns=2") as r:
                animated = await r.read()
            async with http.get(f"{base}/interpolation.png?{query}") as r:
                strip = await r.read()
            async with http.get(f"{base}/interpolation.png?from=3,5&to=11&from_label=3&to_label=8") as r:
                uneven = r.status, await r.json()
            return animated, strip, uneven, (await stub.Interpolate(moving)).animation

    animated, strip, uneven, over_grpc = asyncio.run(go())
    assert animated == over_grpc
    assert Image.open(io.BytesIO(strip)).size == (5 * 30 + 2, 2 * 30 + 2)  # a row of five frames per path
    assert uneven == (400, {"error": "to: 1 seeds, as many as from (2) needed"})
