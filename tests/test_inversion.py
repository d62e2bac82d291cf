"""Inversion (issue 27): the encoder contract (encoder.onnx tied to its model.onnx), the registry serving a version with
or without one, `Invert` over ganserve.v1 and HTTP, the refinement, and bad input naming the field.

The encoder here is the `tiny` preset's (30 steps), trained on a copy of the shipped generator: what these tests check
is the serving, not the quality, which `python -m training.invert` measures (README, "Inversion").
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import shutil

import aiohttp
import grpc
import numpy as np
import onnx
import pytest

from service import encode, inversion
from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.contract import ContractError, EncoderSpec, ModelSpec, file_sha256, seed_latent
from service.repository import ENCODER_FILE
from testkit.process import ROOT, shipped_version
from testkit.servefix import ECHO_LATENT, echo_encoder, echo_model, running
from training import encoder as encoder_mod

MODEL = "mnist-cdcgan"
SPEC = ModelSpec("image", 100, "normal", tuple("0123456789"), (1, 28, 28), (-1.0, 1.0))
SHA = "ab" * 32


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """mnist-cdcgan with a tiny encoder; `changed`, its generator with one byte of metadata more and the same encoder
    (made for another file); `broken`, an encoder.onnx that is not ONNX; `bare`, no encoder at all; `echo`, the echo
    model with its exact inverse."""
    root = tmp_path_factory.mktemp("inversion")
    source = ROOT / "models" / MODEL / str(shipped_version(MODEL)) / "model.onnx"
    folder = root / MODEL / "1"
    folder.mkdir(parents=True)
    shutil.copyfile(source, folder / "model.onnx")
    assert encoder_mod.main([str(folder / "model.onnx"), "--preset", "tiny", "--no-progress"]) == 0
    changed = onnx.load(str(source))
    changed.metadata_props.add(key="note", value="another file")
    for name, model in (("changed", changed), ("broken", None), ("bare", None)):
        (root / name / "1").mkdir(parents=True)
        if model is None:
            shutil.copyfile(source, root / name / "1" / "model.onnx")
        else:
            onnx.save(model, str(root / name / "1" / "model.onnx"))
    shutil.copyfile(folder / ENCODER_FILE, root / "changed" / "1" / ENCODER_FILE)
    (root / "broken" / "1" / ENCODER_FILE).write_bytes(b"not onnx")
    echo_model(root / "echo" / "1" / "model.onnx")
    echo_encoder(root / "echo" / "1")
    return root


def test_the_encoder_spec_round_trips_and_refuses_what_it_does_not_fit():
    spec = EncoderSpec(SHA, 100, tuple("0123456789"), (1, 28, 28), (-1.0, 1.0), {"steps": "30"})
    again = EncoderSpec.from_metadata(spec.to_metadata())
    assert again == spec and again.provenance == {"steps": "30"}
    spec.check(SPEC, SHA)
    with pytest.raises(ContractError, match=r"^generator_sha256: made for the generator ababababab"):
        spec.check(SPEC, "cd" * 32)
    with pytest.raises(ContractError, match=r"^spec: latent_dim"):
        spec.check(dataclasses.replace(SPEC, latent_dim=64), SHA)
    for changes, message in (
        ({"kind": "image"}, "kind: 'image' is not an encoder's"),
        ({"generator_sha256": "xyz"}, "generator_sha256: not a SHA-256"),
        ({"format_version": "2"}, "format_version: '2' is not an encoder format this reader knows"),
        ({"latent_dim": "many"}, "unreadable encoder metadata"),
    ):
        with pytest.raises(ContractError, match=f"^{message}"):
            EncoderSpec.from_metadata(spec.to_metadata() | changes)
    meta = spec.to_metadata()
    del meta["image_shape"]
    with pytest.raises(ContractError, match="lacks 'image_shape'"):
        EncoderSpec.from_metadata(meta)


def test_versions_serve_with_a_matching_encoder_and_say_why_not_otherwise(repo):
    async def go():
        async with running(repo) as (_server, stub, channel):
            infos = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
            index = await pb_grpc.ModelAdminStub(channel).RepositoryIndex(pb.RepositoryIndexRequest())
            errors = {}
            for name in ("changed", "bare"):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Invert(pb.InvertRequest(model=name, images=[b"x"]))
                errors[name] = e.value
            return infos, {v.name: v for v in index.versions}, errors

    infos, index, errors = asyncio.run(go())
    invertible = {n: m.invertible for n, m in infos.items()}
    assert invertible == {MODEL: True, "changed": False, "broken": False, "bare": False, "echo": True}
    assert all(v.state == pb.VERSION_STATE_READY for v in index.values())  # the generators serve either way
    assert index[MODEL].reason == "" and index["bare"].reason == ""
    assert index["changed"].reason.startswith("serving without inversion: encoder.onnx refused: generator_sha256")
    assert index["broken"].reason.startswith("serving without inversion: encoder.onnx refused:")
    assert errors["changed"].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "serves no inversion: encoder.onnx refused: generator_sha256" in errors["changed"].details()
    assert errors["bare"].details() == (
        "model: 'bare' version 1 serves no inversion: no encoder.onnx lies beside its model.onnx"
        " (`python -m training.encoder` makes one)"
    )


def test_invert_answers_a_z_that_generate_draws_again(repo):
    async def go():
        async with running(repo) as (_server, stub, _):
            samples = await stub.Generate(pb.GenerateRequest(
                model=MODEL, seeds=pb.SeedList(seeds=[11, 12, 13]), labels=[pb.Label(index=4)],
                output=pb.OutputOptions(format=pb.RAW_UINT8),
            ))  # fmt: skip
            pngs = [encode.png(np.frombuffer(b, np.uint8).reshape(28, 28, 1)) for b in samples.images]
            by_file = await stub.Invert(pb.InvertRequest(model=MODEL, images=pngs))
            by_pixels = await stub.Invert(pb.InvertRequest(model=MODEL, pixels=b"".join(samples.images)))
            again = []
            for inv in by_file.inversions:
                again.append(await stub.Generate(pb.GenerateRequest(
                    model=MODEL, rows=pb.LatentRows(values=inv.z), labels=[pb.Label(index=inv.label)],
                )))  # fmt: skip
            return samples, by_file, by_pixels, again

    samples, by_file, by_pixels, again = asyncio.run(go())
    assert by_file == by_pixels  # files and raw pixels are the same images
    assert len(by_file.inversions) == 3 and by_file.format == pb.PNG and list(by_file.image_shape) == [28, 28, 1]
    for i, (inv, png, drawn) in enumerate(zip(by_file.inversions, by_file.reconstructions, again, strict=True)):
        assert len(inv.z) == 100 and len(inv.class_probabilities) == 10
        assert inv.label == int(np.argmax(inv.class_probabilities)) and inv.passes == 0
        assert inv.distance == inv.encoder_distance  # nothing refined
        assert drawn.images[0] == png  # the z and label go straight back into Generate
        # The distance is the reconstruction's to the input (before its 8-bit rounding, hence the tolerance).
        recon = encode.decode(png, (28, 28, 1)).astype(np.float64)[None] / 255
        original = np.frombuffer(samples.images[i], np.uint8).reshape(1, 28, 28, 1) / 255
        assert inv.distance == pytest.approx(inversion.distances(recon, original)[0], abs=2e-3)


def test_an_exact_encoder_recovers_z_and_the_label(repo):
    """The echo model draws its z and label as pixels, and its encoder reads them back: a known answer, to 8 bits."""

    async def go():
        async with running(repo) as (_server, stub, _):
            drawn = await stub.Generate(pb.GenerateRequest(
                model="echo", seeds=pb.SeedList(seeds=[3]), labels=[pb.Label(name="dog")],
                output=pb.OutputOptions(format=pb.RAW_UINT8),
            ))  # fmt: skip
            return await stub.Invert(pb.InvertRequest(model="echo", pixels=drawn.images[0]))

    (inv,) = asyncio.run(go()).inversions
    assert inv.label == 1 and inv.distance < 1e-5
    assert np.allclose(inv.z, np.clip(seed_latent(3, ECHO_LATENT, "normal"), -1, 1), atol=1 / 255)


def test_refinement_spends_its_passes_gets_closer_and_is_deterministic(repo):
    async def go():
        async with running(repo) as (_server, stub, _):
            sample = await stub.Generate(pb.GenerateRequest(
                model=MODEL, seeds=pb.SeedList(seeds=[21, 22]), labels=[pb.Label(index=2)]
            ))  # fmt: skip
            ask = pb.InvertRequest(model=MODEL, images=list(sample.images), refine_passes=200)
            return await stub.Invert(ask), await stub.Invert(ask)

    first, second = asyncio.run(go())
    assert first == second  # the same images and budget give the same answer
    for inv in first.inversions:
        assert inv.passes == 192  # whole generations of 16 within the 200 asked
        assert inv.distance < inv.encoder_distance


def test_a_deadline_stops_the_refinement_with_the_best_so_far(repo):
    async def go():
        async with running(repo) as (_server, stub, _):
            sample = await stub.Generate(pb.GenerateRequest(model=MODEL, seeds=pb.SeedList(seeds=[5]),
                                                            labels=[pb.Label(index=5)]))  # fmt: skip
            ask = pb.InvertRequest(model=MODEL, images=list(sample.images), refine_passes=10_000)
            return await stub.Invert(ask, timeout=0.5)

    answer = asyncio.run(go())
    (inv,) = answer.inversions
    assert 0 < inv.passes < 10_000 and inv.distance <= inv.encoder_distance


def _animated() -> bytes:
    import io

    from PIL import Image

    frames = [Image.new("L", (28, 28), v) for v in (0, 255)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


ANIMATED = _animated()
BAD = [
    (dict(images=[b""]), "images[0]: empty"),
    (dict(images=[b"GIF89a not really"]), "images[0]: not an image file"),
    (
        dict(images=[encode.png(np.zeros((28, 27, 1), np.uint8))]),
        "images[0]: 27×28 pixels, the model's images are 28×28",
    ),
    # 16 million pixels in a few kilobytes: refused from the header, never decoded.
    (dict(images=[encode.png(np.zeros((4000, 4000, 1), np.uint8))]), "images[0]: 4000×4000 pixels, the model's"),
    (dict(images=[ANIMATED]), "images[0]: an animation; give one still image"),
    (dict(images=[b"II*\x00" + bytes(60)]), "images[0]: not an image file of PNG, JPEG, WEBP, GIF, BMP"),  # a TIFF
    (dict(pixels=bytes(784 + 1)), "pixels: 785 bytes is not a whole number of 28×28×1 images"),
    (dict(pixels=bytes(784), refine_passes=15), "refine_passes: 0, or from 16 (one generation of 16 candidates)"),
    (dict(pixels=bytes(784) * 3, refine_passes=10_000), "refine_passes: 3 images × 10,000 passes is over 20,000"),
    (dict(pixels=bytes(784) * 70), "pixels: 70 images, the limit is 64"),
    (dict(images=[b"x"] * 65), "images: 65 given, the limit per request is 64"),
    (dict(), "images: required"),
    (dict(images=[b"x"], pixels=bytes(784)), "images: give image files or raw pixels, not both"),
    (dict(pixels=bytes(784), refine_passes=10_001), "refine_passes: 0, or from 16"),
    (dict(pixels=bytes(784), output=pb.OutputOptions(grid=True)), "output: grids and latents do not apply"),
]


@pytest.mark.parametrize(("fields", "message"), BAD)
def test_bad_inversions_name_the_field(repo, fields, message):
    async def go():
        async with running(repo, max_images=64) as (_server, stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Invert(pb.InvertRequest(model=MODEL, **fields))
            return e.value

    error = asyncio.run(go())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(message), error.details()


def test_the_http_route_answers_what_grpc_does(repo):
    async def go():
        async with running(repo) as (server, stub, _):
            sample = await stub.Generate(pb.GenerateRequest(model=MODEL, seeds=pb.SeedList(seeds=[7]),
                                                            labels=[pb.Label(index=7)]))  # fmt: skip
            png = sample.images[0]
            grpc_answer = await stub.Invert(pb.InvertRequest(model=MODEL, images=[png], refine_passes=64))
            refused = {}
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s:
                async with s.post(f"/v1/models/{MODEL}/invert?refine=64", data=png) as r:
                    assert r.status == 200, await r.text()
                    answer = await r.json()
                for query, body in (("", b""), ("", b"junk"), ("?refine=x", png), ("?refine=-1", png),
                                    ("?steps=3", png)):  # fmt: skip
                    async with s.post(f"/v1/models/{MODEL}/invert{query}", data=body) as r:
                        refused[query + body[:4].decode(errors="replace")] = (r.status, (await r.json())["error"])
                async with s.post("/v1/models/bare/invert", data=png) as r:
                    bare = (r.status, (await r.json())["error"])
            return grpc_answer, answer, refused, bare

    grpc_answer, answer, refused, bare = asyncio.run(go())
    (inv,) = grpc_answer.inversions
    assert answer["z"] == pytest.approx(list(inv.z)) and answer["label"] == inv.label
    assert answer["distance"] == pytest.approx(inv.distance) and answer["passes"] == inv.passes == 64
    assert base64.b64decode(answer["reconstruction"]) == grpc_answer.reconstructions[0]
    assert refused[""] == (400, "body: empty")
    assert refused["junk"][0] == 400 and refused["junk"][1].startswith("body: not an image file")
    assert refused["?refine=x" + "\ufffdPNG"][1].startswith("refine: an integer")
    assert refused["?refine=-1" + "\ufffdPNG"][1].startswith("refine: 0, or from 16")
    assert refused["?steps=3" + "\ufffdPNG"][1].startswith("query: unknown parameter 'steps'")
    assert bare[0] == 400 and bare[1].startswith("model: 'bare' version 1 serves no inversion")


def test_inverting_the_generators_own_sample_recovers_a_z_that_draws_it():
    """The known answer, with the shipped encoder: a sample of G, inverted and refined, draws that sample again."""
    folder = ROOT / "models" / MODEL / str(shipped_version(MODEL))
    if not (folder / ENCODER_FILE).exists():
        pytest.fail(f"the shipped model has no {ENCODER_FILE}")
    assert file_sha256(folder / "model.onnx")  # readable

    async def go():
        async with running(ROOT / "models") as (_server, stub, _):
            sample = await stub.Generate(pb.GenerateRequest(
                model=MODEL, seeds=pb.SeedList(seeds=list(range(100, 110))), labels=[pb.Label(index=c) for c in range(10)],
            ))  # fmt: skip
            return await stub.Invert(pb.InvertRequest(model=MODEL, images=list(sample.images), refine_passes=1600))

    answer = asyncio.run(go())
    labels = [inv.label for inv in answer.inversions]
    distances = [inv.distance for inv in answer.inversions]
    assert labels == list(range(10)), labels
    assert max(distances) < KNOWN_ANSWER_DISTANCE, distances


# Measured 0.0007–0.0065 for these ten with 1,600 passes; two samples of one class lie 0.016–0.17 apart.
KNOWN_ANSWER_DISTANCE = 0.01


def test_the_frozen_generator_is_the_file_and_passes_gradients(tmp_path):
    import torch
    from onnx import TensorProto, helper

    from training.frozen import FrozenError, FrozenGenerator

    path = ROOT / "models" / MODEL / str(shipped_version(MODEL)) / "model.onnx"
    g = FrozenGenerator(path)  # checked against ONNX Runtime on load, within 1e-4
    z = torch.randn(3, 100, requires_grad=True)
    g(z, torch.eye(10)[:3]).square().mean().backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0
    assert all(not t.requires_grad for t in g.constants.values())  # frozen

    graph = helper.make_graph(
        [helper.make_node("Sin", ["z"], ["images"])], "sin",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 2])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, ModelSpec("points", 2, "normal", (), (2,), None).to_metadata())
    onnx.save(model, str(tmp_path / "sin.onnx"))
    with pytest.raises(FrozenError, match="operator Sin not supported"):
        FrozenGenerator(tmp_path / "sin.onnx")


def _hostile_encoder(folder, z_node, extra_inits, z_rows: str | int = "batch") -> None:
    """An encoder for the echo model whose z comes from `z_node` (given `zs`, the image's first five values)."""
    from onnx import TensorProto, helper

    ints = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    nodes = [
        helper.make_node("Reshape", ["images", "flat_shape"], ["flat"]),
        helper.make_node("Slice", ["flat", "s0", "s5", "axis"], ["zs"]),
        helper.make_node("Slice", ["flat", "s5", "s8", "axis"], ["logits"]),
        z_node,
    ]
    graph = helper.make_graph(
        nodes, "hostile", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [z_rows, ECHO_LATENT]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[ints("flat_shape", [-1, 8]), ints("s0", [0]), ints("s5", [5]), ints("s8", [8]), ints("axis", [1]),
                     *extra_inits],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = EncoderSpec(file_sha256(folder / "model.onnx"), ECHO_LATENT, ("cat", "dog", "eel"), (1, 2, 4), (-1.0, 1.0))
    helper.set_model_props(model, spec.to_metadata())
    onnx.save(model, str(folder / ENCODER_FILE))


def test_an_encoder_that_answers_wrongly_is_refused_at_load(tmp_path):
    """Its graph is untrusted input too: non-finite values, or one row whatever the batch, refuse it at load."""
    from onnx import TensorProto, helper

    for name in ("nan", "one_row"):
        echo_model(tmp_path / name / "1" / "model.onnx")
    nan = helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")])
    _hostile_encoder(tmp_path / "nan" / "1", helper.make_node("Mul", ["zs", "nan"], ["z"]), [nan])
    row = helper.make_tensor("row", TensorProto.FLOAT, [1, ECHO_LATENT], [0.0] * ECHO_LATENT)
    _hostile_encoder(tmp_path / "one_row" / "1", helper.make_node("Identity", ["row"], ["z"]), [row], z_rows=1)

    async def go():
        async with running(tmp_path) as (server, _stub, _):
            return {s.name: s.reason for s in server.registry.status()}

    reasons = asyncio.run(go())
    refused = "serving without inversion: encoder.onnx refused: encoder.onnx answered z"
    assert reasons["nan"].startswith(f"{refused} [2, 5] with non-finite values"), reasons
    assert reasons["one_row"].startswith(f"{refused} [1, 5]"), reasons


def test_refinement_stops_before_a_deadline_it_cannot_meet_and_answers_the_encoders_z(tmp_path):
    """A model that takes 0.1 s a pass, a deadline of 0.6 s on each wire (gRPC's timeout, HTTP's X-Request-Timeout,
    the OIP's `timeout` parameter): a generation (about 16 passes' time) cannot fit after the first pass, so none
    runs, and the answer is the encoder's, in time, with no pass more for the reconstruction."""
    import time

    from testkit.gated import sessions

    folder = tmp_path / "echo" / "1"
    echo_model(folder / "model.onnx")
    echo_encoder(folder)
    runs = []

    def slow(feeds) -> None:
        runs.append(len(feeds["z"]))
        time.sleep(0.1)

    pixels = bytes([128] * 8)

    async def go():
        async with running(tmp_path, session_factory=sessions(echo=slow)) as (server, stub, _):
            answers = {}
            grpc_answer = await stub.Invert(
                pb.InvertRequest(model="echo", pixels=pixels, refine_passes=10_000), timeout=0.6
            )  # fmt: skip
            answers["grpc"] = (grpc_answer.inversions[0].passes, len(runs))
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s:
                png = encode.png(np.frombuffer(pixels, np.uint8).reshape(2, 4, 1))
                headers = {"X-Request-Timeout": "0.6"}
                async with s.post("/v1/models/echo/invert?refine=10000", data=png, headers=headers) as r:
                    answers["http"] = ((await r.json())["passes"], len(runs))
                body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 4, 1], "data": list(pixels)}],
                        "parameters": {"refine": 10_000, "timeout": 600_000}}  # fmt: skip
                async with s.post("/v2/models/echo/infer", json=body) as r:
                    answers["oip"] = ((await r.json())["parameters"]["passes"], len(runs))
            return answers

    answers = asyncio.run(go())
    # Each wire's deadline, the same budget: no generation, one pass of the encoder's z, none for the answer.
    assert answers == {"grpc": (0, 1), "http": (0, 2), "oip": (0, 3)}, answers


def test_an_images_answer_does_not_depend_on_the_images_beside_it(repo):
    async def go():
        async with running(repo) as (_server, stub, _):
            sample = await stub.Generate(pb.GenerateRequest(
                model=MODEL, seeds=pb.SeedList(seeds=[31, 32]), labels=[pb.Label(index=6)]
            ))  # fmt: skip
            alone = await stub.Invert(pb.InvertRequest(model=MODEL, images=sample.images[:1], refine_passes=64))
            together = await stub.Invert(pb.InvertRequest(model=MODEL, images=sample.images, refine_passes=64))
            return alone, together

    alone, together = asyncio.run(go())
    assert list(alone.inversions[0].z) == list(together.inversions[0].z)
    assert alone.reconstructions[0] == together.reconstructions[0]


def test_colour_images_are_read_as_grey(repo):
    async def go():
        async with running(repo) as (_server, stub, _):
            grey = await stub.Generate(pb.GenerateRequest(model=MODEL, seeds=pb.SeedList(seeds=[8]),
                                                          labels=[pb.Label(index=8)], output=pb.OutputOptions(format=pb.RAW_UINT8)))  # fmt: skip
            pixels = np.frombuffer(grey.images[0], np.uint8).reshape(28, 28, 1)
            rgb = encode.png(np.repeat(pixels, 3, axis=2))
            return (await stub.Invert(pb.InvertRequest(model=MODEL, images=[rgb]))), (
                await stub.Invert(pb.InvertRequest(model=MODEL, pixels=grey.images[0]))
            )

    from_rgb, from_grey = asyncio.run(go())
    assert from_rgb == from_grey  # an RGB file of greys is the same image
