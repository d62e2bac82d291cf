"""Edit (issue 26, part 2): latents moved along a named direction, or the caller's own vector, on every wire.

On the echo model, whose images show their latents, an edit is checked to be exactly ψ·z + s·direction (the class's
vector for per-class directions, a blend for soft labels). On the shipped model, ganserve.v1, the HTTP route and the
OIP over REST and gRPC give the same pixels, animations show the grid's columns frame by frame, and bad input gets
an error naming the field on each wire.
"""

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
from service.api.inference import grpc_predict_v2_pb2 as ipb
from service.api.inference import grpc_predict_v2_pb2_grpc as ipb_grpc
from service.contract import seed_latent
from testkit.process import ROOT, shipped_version
from testkit.servefix import ECHO_DIRECTIONS, ECHO_LATENT, echo_model, plain_model, running

MODEL = "mnist-cdcgan"
SEVEN = [pb.Label(index=7)]
STRENGTHS = [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]  # the routes' default
P = ipb.InferParameter


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    echo_model(root / "echo" / "1" / "model.onnx")
    plain_model(root / "plain" / "1" / "model.onnx")  # a file without directions
    version = str(shipped_version(MODEL))
    shutil.copytree(ROOT / "models" / MODEL / version, root / MODEL / version)
    return root


def _floats(answer: pb.GenerateResponse) -> np.ndarray:
    """The echo model's images as [n, 8]: clip(z) [5] then y [3]."""
    return np.stack([np.frombuffer(image, "<f4") for image in answer.images])


def _pixels(answer: pb.GenerateResponse) -> np.ndarray:
    h, w, c = answer.image_shape
    return np.stack([np.frombuffer(image, np.uint8).reshape(h, w, c) for image in answer.images])


def test_an_edit_is_psi_z_plus_strength_times_the_labels_direction(repo):
    raw = pb.OutputOptions(format=pb.RAW_FLOAT32)
    strengths = [-0.5, 0.0, 0.25]

    async def go():
        async with running(repo) as (_server, stub, _):
            per_class = await stub.Edit(pb.EditRequest(
                model="echo", seeds=pb.SeedList(seeds=[3, 9]), labels=[pb.Label(index=0), pb.Label(name="eel")],
                direction="per_class", strengths=strengths, truncation=0.5, output=raw,
            ))  # fmt: skip
            blended = await stub.Edit(pb.EditRequest(
                model="echo", seeds=pb.SeedList(seeds=[3]), labels=[pb.Label(soft=pb.SoftLabel(weights=[1, 1, 0]))],
                direction="per_class", strengths=[0.5], output=raw,
            ))  # fmt: skip
            shared = await stub.Edit(pb.EditRequest(
                model="echo", rows=pb.LatentRows(values=[0.1] * ECHO_LATENT), labels=[pb.Label(index=1)],
                direction="first", strengths=[-0.25, 0.5], output=raw,
            ))  # fmt: skip
            own = await stub.Edit(pb.EditRequest(
                model="echo", seeds=pb.SeedList(seeds=[3]), labels=[pb.Label(index=1)],
                vector=pb.LatentRows(values=[0, 0, 0, 0, 2]), strengths=[0.25], output=raw,
            ))  # fmt: skip
            return per_class, blended, shared, own

    per_class, blended, shared, own = asyncio.run(go())
    z3, z9 = (seed_latent(s, ECHO_LATENT, "normal") for s in (3, 9))
    axes = np.eye(ECHO_LATENT, dtype=np.float32)
    # A row per latent, a column per strength; cat moves z[1], eel z[3] (ECHO_DIRECTIONS).
    want = [0.5 * z + s * axes[axis] for z, axis in ((z3, 1), (z9, 3)) for s in strengths]
    got = _floats(per_class)
    assert got.shape == (6, 8)
    assert np.allclose(got[:, :5], np.clip(want, -1, 1), atol=1e-6)
    assert np.array_equal(got[:, 5:], np.repeat(np.eye(3, dtype=np.float32)[[0, 2]], 3, 0))
    # Half cat, half dog: the classes' vectors blended, then unit length again.
    assert np.allclose(_floats(blended)[0, :5], np.clip(z3 + 0.5 * (axes[1] + axes[2]) / np.sqrt(2), -1, 1), atol=1e-6)
    assert np.allclose(_floats(shared)[:, :5], np.clip([0.1 + s * axes[0] for s in (-0.25, 0.5)], -1, 1), atol=1e-6)
    assert np.allclose(_floats(own)[0, :5], np.clip(z3 + 0.5 * axes[4], -1, 1), atol=1e-6)  # as given: not normalised
    assert ECHO_DIRECTIONS[1].per_class  # the test above relies on it


def test_every_wire_gives_the_same_edit(repo):
    query = "seeds=0-3&label=7&direction=slant"

    async def go():
        async with running(repo) as (server, stub, channel):
            grid = await stub.Edit(pb.EditRequest(
                model=MODEL, seed_range=pb.SeedRange(start=0, count=4), labels=SEVEN, direction="slant",
                strengths=STRENGTHS, output=pb.OutputOptions(grid=True, grid_only=True),
            ))  # fmt: skip
            pixels = await stub.Edit(pb.EditRequest(
                model=MODEL, seed_range=pb.SeedRange(start=0, count=4), labels=SEVEN, direction="slant",
                strengths=STRENGTHS, output=pb.OutputOptions(format=pb.RAW_UINT8),
            ))  # fmt: skip
            plain = await stub.Generate(pb.GenerateRequest(
                model=MODEL, seed_range=pb.SeedRange(start=0, count=4), labels=SEVEN,
                output=pb.OutputOptions(format=pb.RAW_UINT8),
            ))  # fmt: skip
            parameters = {"seeds": "0-3", "labels": "7", "direction": "slant", "datatype": "UINT8"}
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s:
                async with s.get(f"/v1/models/{MODEL}/edit.png?{query}") as r:
                    assert r.status == 200 and r.content_type == "image/png"
                    png = await r.read()
                body = {"inputs": [], "parameters": parameters}
                async with s.post(f"/v2/models/{MODEL}/infer", json=body) as r:
                    assert r.status == 200, await r.text()
                    rest = (await r.json())["outputs"][0]
            oip = ipb_grpc.GRPCInferenceServiceStub(channel)
            typed = {
                "seeds": P(string_param="0-3"), "labels": P(string_param="7"), "direction": P(string_param="slant"),
                "datatype": P(string_param="UINT8"),
            }  # fmt: skip
            infer = await oip.ModelInfer(ipb.ModelInferRequest(model_name=MODEL, parameters=typed))
            return grid, pixels, plain, png, rest, infer

    grid, pixels, plain, png, rest, infer = asyncio.run(go())
    assert png == grid.grid_png
    images = _pixels(pixels)
    assert images.shape == (28, 28, 28, 1)  # 4 seeds × 7 strengths
    by_seed = images.reshape(4, 7, 28, 28, 1)
    assert np.array_equal(by_seed[:, 3], _pixels(plain))  # strength 0 is the unedited sample
    assert not np.array_equal(by_seed[:, 0], by_seed[:, 6])
    assert rest["shape"] == [28, 28, 28, 1] and np.array_equal(np.array(rest["data"], np.uint8), images.ravel())
    assert list(infer.outputs[0].shape) == [28, 28, 28, 1]
    assert np.frombuffer(infer.raw_output_contents[0], np.uint8).tobytes() == images.tobytes()


def _frames(data: bytes) -> list[np.ndarray]:
    image = Image.open(io.BytesIO(data))
    frames = []
    for i in range(image.n_frames):
        image.seek(i)
        frames.append(np.asarray(image.convert("L")))
    return frames


def test_animated_strengths_are_the_grids_columns_frame_by_frame(repo):
    async def go():
        async with running(repo) as (server, stub, _):
            still = await stub.Edit(pb.EditRequest(
                model=MODEL, seeds=pb.SeedList(seeds=[5, 6, 7]), labels=SEVEN, direction="width",
                strengths=STRENGTHS, output=pb.OutputOptions(format=pb.RAW_UINT8),
            ))  # fmt: skip
            moving = await stub.Edit(pb.EditRequest(
                model=MODEL, seeds=pb.SeedList(seeds=[5, 6, 7]), labels=SEVEN, direction="width",
                strengths=STRENGTHS, output=pb.OutputOptions(grid_columns=3),
                animation=pb.AnimationOptions(format=pb.ANIMATION_FORMAT_APNG, fps=5),
            ))  # fmt: skip
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s:
                url = f"/v1/models/{MODEL}/edit.gif?seeds=5,6,7&label=7&direction=width&columns=3&fps=5"
                async with s.get(url) as r:
                    assert r.status == 200 and r.content_type == "image/gif"
                    gif = await r.read()
            return still, moving, gif

    still, moving, gif = asyncio.run(go())
    by_seed = _pixels(still).reshape(3, 7, 28, 28, 1)
    expected = [encode.grid(by_seed[:, j], 3)[..., 0] for j in range(7)]  # each frame: every seed at strength j
    assert moving.animation_type == "image/apng" and not moving.images
    for data in (moving.animation, gif):
        frames = _frames(data)
        assert len(frames) == 7 and all(np.array_equal(f, e) for f, e in zip(frames, expected, strict=True))


def test_models_list_their_directions_on_every_wire(repo):
    async def go():
        async with running(repo) as (server, stub, _):
            echo = await stub.GetModel(pb.GetModelRequest(name="echo"))
            plain = await stub.GetModel(pb.GetModelRequest(name="plain"))
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s:
                async with s.get("/v1/models") as r:
                    listed = {m["name"]: m for m in (await r.json())["models"]}
                async with s.get(f"/v2/models/{MODEL}") as r:
                    oip = (await r.json())["parameters"]
            return echo, plain, listed, oip

    echo, plain, listed, oip = asyncio.run(go())
    assert [(d.name, d.kind, d.per_class) for d in echo.directions] == [
        ("first", "sefa", False), ("per_class", "attribute", True)
    ]  # fmt: skip
    assert list(echo.directions[0].vector) == [1, 0, 0, 0, 0] and "directions" not in echo.metadata
    assert not plain.directions and listed["plain"]["directions"] == []
    shipped = [d["name"] for d in listed[MODEL]["directions"]]
    assert shipped == ["sefa1", "sefa2", "sefa3", "sefa4", "sefa5", "ink", "slant", "width"]
    assert all(d["description"] for d in listed[MODEL]["directions"])
    assert oip["directions"] == ",".join(shipped)


# (request fields, the start of the message): each names the field at fault in ganserve.v1's words.
GRPC_BAD = [
    (dict(direction="tilt", strengths=[1]), "direction: unknown direction 'tilt' (directions: first, per_class)"),
    (dict(strengths=[1]), "direction: required"),
    (dict(direction="first"), "strengths: 0 given, from 1 to 64 needed"),
    (dict(direction="first", strengths=[0.5] * 65), "strengths: 65 given"),
    (dict(direction="first", strengths=[float("nan")]), "strengths: each a finite number within ±100"),
    (dict(direction="first", strengths=[101]), "strengths: each a finite number within ±100"),
    (dict(vector=pb.LatentRows(values=[1, 2]), strengths=[1]), "vector.values: exactly one row of 5 values (got 2)"),
    (dict(vector=pb.LatentRows(values=[float("inf")] * 5), strengths=[1]), "vector.values: values must be finite"),
    (dict(vector=pb.LatentRows(values=[3e38] * 5), strengths=[100]), "vector.values: values must be finite"),
    (dict(direction="first", strengths=[1], labels=[]), "labels: model 'echo' is conditional"),
    (dict(direction="first", strengths=[1], labels=[pb.Label(index=9)]), "labels[0].index: unknown class 9"),
    (dict(direction="first", strengths=[1], truncation=2), "truncation: must be in (0, 1]"),
    (dict(direction="first", strengths=[0.1] * 64, seeds=pb.SeedList(seeds=[1, 2])), "strengths: 2 latents × 64"),
    (dict(direction="first", strengths=[1], animation=pb.AnimationOptions()), "animation.format: required"),
    (dict(direction="first", strengths=[1], seeds=pb.SeedList()), "seeds.seeds: empty"),
]


@pytest.mark.parametrize(("fields", "message"), GRPC_BAD)
def test_bad_edits_over_grpc_name_the_field(repo, fields, message):
    request = pb.EditRequest(model="echo", seeds=pb.SeedList(seeds=[1]), labels=[pb.Label(index=0)])
    request.MergeFrom(pb.EditRequest(**{k: v for k, v in fields.items() if k != "labels"}))
    if "labels" in fields:
        del request.labels[:]
        request.labels.extend(fields["labels"])
    if "seeds" in fields:
        request.seeds.CopyFrom(fields["seeds"])

    async def go():
        async with running(repo, max_images=64) as (_server, stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Edit(request)
            return e.value

    error = asyncio.run(go())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(message), error.details()


def test_a_model_without_directions_says_so_and_takes_a_vector(repo):
    async def go():
        async with running(repo) as (_server, stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Edit(pb.EditRequest(model="plain", seeds=pb.SeedList(seeds=[1]), direction="ink",
                                               strengths=[1]))  # fmt: skip
            ok = await stub.Edit(pb.EditRequest(model="plain", seeds=pb.SeedList(seeds=[1]), strengths=[0, 1],
                                                vector=pb.LatentRows(values=[1] + [0] * 7)))  # fmt: skip
            return e.value, ok

    error, ok = asyncio.run(go())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("direction: model 'plain' version 1 lists no directions")
    assert len(ok.images) == 2


# (query, the start of the message) for edit.png and edit.gif: each names the query parameter at fault.
HTTP_BAD = [
    ("seeds=1&label=7&direction=tilt", "direction: unknown direction 'tilt'"),
    ("seeds=1&label=7", "direction: required"),
    ("seeds=1&label=7&direction=ink&strengths=1,x", "strengths: a number (got 'x')"),
    ("seeds=1&label=7&direction=ink&strengths=", "strengths: comma-separated numbers"),
    ("seeds=1&label=7&direction=ink&strengths=1e9", "strengths: each a finite number within ±100"),
    ("seeds=1&label=7&vector=1,2", "vector: exactly one row of 100 values (got 2)"),
    ("seeds=1&label=7&vector=1,2&direction=ink", "direction: give a direction or a vector, not both"),
    ("seeds=1&label=eleven&direction=ink", "label: unknown class 'eleven'"),
    ("seeds=1&direction=ink", "label: model 'mnist-cdcgan' is conditional"),
    ("seeds=1&label=7&direction=ink&psi=7", "psi: must be in (0, 1]"),
    ("seeds=0-99&label=7&direction=ink", "strengths: 100 latents × 7 strengths make 700 images"),
    ("seeds=1&label=7&direction=ink&steps=3", "query: unknown parameter 'steps'"),
]


@pytest.mark.parametrize(("query", "message"), HTTP_BAD)
def test_bad_edits_over_http_name_the_parameter(repo, query, message):
    async def go():
        async with (
            running(repo, max_images=512) as (server, _, _),
            aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s,
            s.get(f"/v1/models/{MODEL}/edit.png?{query}") as r,
        ):
            return r.status, await r.json()

    status, body = asyncio.run(go())
    assert status == 400 and body["error"].startswith(message), body


# (parameters, the start of the message) for ModelInfer over REST: each names parameters.<key>.
OIP_BAD = [
    ({"seeds": "1", "labels": "7", "direction": "tilt"}, "parameters.direction: unknown direction 'tilt'"),
    ({"seeds": "1", "labels": "7", "direction": 3}, "parameters.direction: a name (got int)"),
    ({"seeds": "1", "labels": "7", "strengths": "1"}, "parameters.direction: required"),
    ({"seeds": "1", "labels": "7", "direction": "ink", "strengths": "a"}, "parameters.strengths: a number"),
    ({"seeds": "1", "labels": "7", "direction": "ink", "strengths": True}, "parameters.strengths: comma-separated"),
    ({"seeds": "1", "labels": "7", "direction": "ink", "strengths": 500}, "parameters.strengths: each a finite"),
    ({"seeds": "1", "direction": "ink"}, "parameters.labels: model 'mnist-cdcgan' is conditional"),
]


@pytest.mark.parametrize(("parameters", "message"), OIP_BAD)
def test_bad_edits_over_the_oip_name_the_parameter(repo, parameters, message):
    async def go():
        body = {"inputs": [], "parameters": parameters}
        async with (
            running(repo) as (server, _, _),
            aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s,
            s.post(f"/v2/models/{MODEL}/infer", json=body) as r,
        ):
            return r.status, await r.json()

    status, body = asyncio.run(go())
    assert status == 400 and body["error"].startswith(message), body


def test_oip_edits_z_tensors_and_refuses_a_y_tensor_beside_a_direction(repo):
    z = np.stack([seed_latent(s, ECHO_LATENT, "normal") for s in (3, 9)])

    async def go():
        async with running(repo) as (_server, _, channel):
            oip = ipb_grpc.GRPCInferenceServiceStub(channel)
            tensor = ipb.ModelInferRequest.InferInputTensor(
                name="z", datatype="FP32", shape=[2, ECHO_LATENT], contents=ipb.InferTensorContents(fp32_contents=z.ravel())
            )  # fmt: skip
            parameters = {"labels": P(string_param="cat"), "direction": P(string_param="first"),
                          "strengths": P(string_param="-0.5,0.5")}  # fmt: skip
            edited = await oip.ModelInfer(
                ipb.ModelInferRequest(model_name="echo", inputs=[tensor], parameters=parameters)
            )
            y = ipb.ModelInferRequest.InferInputTensor(
                name="y", datatype="FP32", shape=[1, 3], contents=ipb.InferTensorContents(fp32_contents=[1, 0, 0])
            )  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await oip.ModelInfer(ipb.ModelInferRequest(
                    model_name="echo", inputs=[tensor, y], parameters={"direction": P(string_param="first")}
                ))  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as lone:  # strengths without a direction are not dropped
                await oip.ModelInfer(ipb.ModelInferRequest(model_name="echo", inputs=[tensor], parameters={
                    "labels": P(string_param="cat"), "strengths": P(string_param="1")}))  # fmt: skip
            assert lone.value.details().startswith("parameters.direction: required"), lone.value.details()
            return edited, e.value

    edited, error = asyncio.run(go())
    got = np.frombuffer(edited.raw_output_contents[0], "<f4").reshape(4, 8)
    axes = np.eye(ECHO_LATENT, dtype=np.float32)
    want = [row + s * axes[0] for row in z for s in (-0.5, 0.5)]
    assert np.allclose(got[:, :5], np.clip(want, -1, 1), atol=1e-6)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("parameters.direction: give labels as parameters with it, not a y tensor")
