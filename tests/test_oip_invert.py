"""Inversion over the Open Inference Protocol (issue 27): an `images` UINT8 tensor back to latents, on gRPC and REST.

On the shipped model and its encoder, the OIP's output tensors (z, label, probabilities, the
distances, the reconstructions) and its `passes` parameter are exactly what ganserve.v1's Invert answers for the same
pixels, through our stubs, REST in JSON and in the binary extension, and Triton's own clients; the outputs a request
lists are the ones answered, in its order; bad input gets an error naming the field on both wires. An unconditional
toy model with an exact encoder shows that label and probabilities are only a conditional model's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from service import domain as dm
from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.inference import grpc_predict_v2_pb2 as ipb
from service.api.inference import grpc_predict_v2_pb2_grpc as ipb_grpc
from service.contract import EncoderSpec, file_sha256
from service.frontends import oip
from service.repository import ENCODER_FILE
from testkit.process import ROOT, shipped_version
from testkit.servefix import plain_model, running

MODEL = "mnist-cdcgan"
PLAIN = "inv-plain"  # unconditional, images [n, 1, 2, 4] = clip(z [n, 8]), with its exact inverse as encoder
P = ipb.InferParameter
Out = ipb.ModelInferRequest.InferRequestedOutputTensor
DTYPES = {"FP32": "<f4", "UINT8": "u1", "INT64": "<i8"}
SEEDS, LABELS = [0, 1, 2, 3], [3, 7, 1, 9]
ALL = ["z", "label", "probabilities", "distance", "encoder_distance", "images"]
PLAIN_PIXELS = np.arange(0, 256, 16, dtype=np.uint8).reshape(2, 2, 4, 1)  # two of PLAIN's images, [n, H, W, C]


def _plain_encoder(folder: Path) -> Path:
    """The plain model's inverse: z = the image's 8 values (exact where the model did not clip)."""
    shape = helper.make_tensor("flat_shape", TensorProto.INT64, [2], [-1, 8])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["images", "flat_shape"], ["z"])], "plain-encoder",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 8])], initializer=[shape],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = EncoderSpec(file_sha256(folder / "model.onnx"), 8, (), (1, 2, 4), (-1.0, 1.0))
    helper.set_model_props(model, spec.to_metadata())
    onnx.save_model(model, str(folder / ENCODER_FILE))
    return folder / ENCODER_FILE


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The shipped generator with its encoder (tests/test_inversion.py trains one), a model without one, and PLAIN."""
    root = tmp_path_factory.mktemp("oip_invert")
    version = str(shipped_version(MODEL))
    shutil.copytree(ROOT / "models" / MODEL / version, root / MODEL / version)
    plain_model(root / "plain" / "1" / "model.onnx")  # no encoder
    plain_model(root / PLAIN / "1" / "model.onnx")
    _plain_encoder(root / PLAIN / "1")
    return root


# ---- the wires, turned into {name: array} ---------------------------------------------------------------------


def grpc_request(
    model: str, tensors: list[tuple[str, str, list[int], np.ndarray]], parameters: dict | None = None,
    outputs: list[tuple[str, str | None]] = (), typed: bool = False,
) -> ipb.ModelInferRequest:  # fmt: skip
    """tensors: (name, datatype, shape, values); raw_input_contents unless `typed` (uint_contents, fp32_contents)."""
    request = ipb.ModelInferRequest(model_name=model)
    for name, datatype, shape, values in tensors:
        t = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if typed:
            if datatype == "UINT8":
                t.contents.uint_contents.extend(np.asarray(values).ravel().tolist())
            else:
                t.contents.fp32_contents.extend(np.asarray(values, np.float32).ravel().tolist())
        else:
            request.raw_input_contents.append(np.ascontiguousarray(values).tobytes())
    for key, value in (parameters or {}).items():
        request.parameters[key].CopyFrom(_parameter(value))
    for name, datatype in outputs:
        out = request.outputs.add(name=name)
        if datatype is not None:
            out.parameters["datatype"].string_param = datatype
    return request


def _parameter(value) -> ipb.InferParameter:
    if isinstance(value, bool):
        return P(bool_param=value)
    return P(int64_param=value) if isinstance(value, int) else P(string_param=str(value))


def from_grpc(answer: ipb.ModelInferResponse) -> tuple[dict[str, np.ndarray], dict]:
    assert len(answer.raw_output_contents) == len(answer.outputs)
    arrays = {
        t.name: np.frombuffer(raw, DTYPES[t.datatype]).reshape(list(t.shape))
        for t, raw in zip(answer.outputs, answer.raw_output_contents, strict=True)
    }
    return arrays, {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in answer.parameters.items()}


def rest_body(
    tensors: list[tuple[str, str, list[int], np.ndarray]], parameters: dict | None = None,
    outputs: list[dict] | None = None, binary: bool = True,
) -> tuple[bytes, dict[str, str]]:  # fmt: skip
    """The body and headers: tensors as bytes after the JSON (binary), or as JSON numbers."""
    doc: dict = {"inputs": [], "parameters": parameters or {}}
    blobs = []
    for name, datatype, shape, values in tensors:
        tensor = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blobs.append(np.ascontiguousarray(values).tobytes())
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = np.asarray(values).ravel().tolist()
        doc["inputs"].append(tensor)
    if outputs is not None:
        doc["outputs"] = outputs
    head = json.dumps(doc).encode()
    if not binary:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


async def rest(session: aiohttp.ClientSession, model: str, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
    async with session.post(f"/v2/models/{model}/infer", data=body, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


def from_rest(status: int, headers: dict, body: bytes) -> tuple[dict[str, np.ndarray], dict, list[bool]]:
    """The answer's arrays by name, its parameters, and which outputs came as binary."""
    assert status == 200, body[:500]
    split = int(headers.get("Inference-Header-Content-Length", len(body)))
    doc, rest_bytes, offset = json.loads(body[:split]), body[split:], 0
    arrays, binary = {}, []
    for t in doc["outputs"]:
        size = t.get("parameters", {}).get("binary_data_size")
        binary.append(size is not None)
        if size is None:
            values = np.asarray(t["data"], DTYPES[t["datatype"]])
        else:
            values = np.frombuffer(rest_bytes, DTYPES[t["datatype"]], size // np.dtype(DTYPES[t["datatype"]]).itemsize,
                                   offset)  # fmt: skip
            offset += size
        arrays[t["name"]] = values.reshape(t["shape"])
    assert offset == len(rest_bytes)
    return arrays, doc.get("parameters", {}), binary


def from_ganserve(answer: pb.InvertResponse) -> tuple[dict[str, np.ndarray], int]:
    """ganserve.v1's Invert as the OIP's tensors would hold it; and its passes."""
    inv = answer.inversions
    dtype = "u1" if answer.format == pb.RAW_UINT8 else "<f4"
    arrays = {
        "z": np.array([i.z for i in inv], np.float32), "label": np.array([i.label for i in inv], np.int64),
        "probabilities": np.array([i.class_probabilities for i in inv], np.float32),
        "distance": np.array([i.distance for i in inv], np.float32),
        "encoder_distance": np.array([i.encoder_distance for i in inv], np.float32),
        "images": np.frombuffer(b"".join(answer.reconstructions), dtype).reshape(len(inv), *answer.image_shape),
    }  # fmt: skip
    assert len({i.passes for i in inv}) == 1
    return arrays, inv[0].passes


def same(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], names=ALL) -> None:
    assert list(ours) == list(names)
    for name in names:
        assert ours[name].dtype == theirs[name].dtype, name
        assert ours[name].shape == theirs[name].shape and ours[name].tobytes() == theirs[name].tobytes(), name


async def _digits(stub) -> np.ndarray:
    """Digits as the model draws them, uint8 [4, 28, 28, 1]: what a client would invert."""
    drawn = await stub.Generate(pb.GenerateRequest(
        model=MODEL, seeds=pb.SeedList(seeds=SEEDS), labels=[pb.Label(index=k) for k in LABELS],
        output=pb.OutputOptions(format=pb.RAW_UINT8),
    ))  # fmt: skip
    return np.frombuffer(b"".join(drawn.images), np.uint8).reshape(len(SEEDS), 28, 28, 1)


# ---- the answers ----------------------------------------------------------------------------------------------


def test_every_wire_inverts_as_ganserve_does(repo):
    refine = 48

    async def go():
        async with running(repo) as (server, stub, channel):
            o = ipb_grpc.GRPCInferenceServiceStub(channel)
            pixels = await _digits(stub)
            images = [("images", "UINT8", list(pixels.shape), pixels)]
            theirs = {
                fmt: await stub.Invert(pb.InvertRequest(model=MODEL, pixels=pixels.tobytes(), refine_passes=refine,
                                                        output=pb.OutputOptions(format=fmt)))
                for fmt in (pb.RAW_FLOAT32, pb.RAW_UINT8)
            }  # fmt: skip
            grpc_answers = {
                "fp32": await o.ModelInfer(grpc_request(MODEL, images, {"refine": refine})),
                "uint8": await o.ModelInfer(grpc_request(MODEL, images, {"refine": refine, "datatype": "UINT8"})),
                "typed": await o.ModelInfer(grpc_request(MODEL, images, {"refine": refine}, typed=True)),
            }
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s:
                rest_answers = {
                    "json": await rest(s, MODEL, *rest_body(images, {"refine": refine}, binary=False)),
                    "binary": await rest(s, MODEL, *rest_body(images, {"refine": refine, "datatype": "UINT8",
                                                                       "binary_data_output": True})),
                }  # fmt: skip
            return pixels, theirs, grpc_answers, rest_answers

    pixels, theirs, grpc_answers, rest_answers = asyncio.run(go())
    fp32, passes = from_ganserve(theirs[pb.RAW_FLOAT32])
    uint8, _ = from_ganserve(theirs[pb.RAW_UINT8])
    assert passes == refine and fp32["images"].shape == (4, 1, 28, 28) and uint8["images"].shape == (4, 28, 28, 1)
    assert fp32["probabilities"].shape == (4, 10) and fp32["z"].shape == (4, 100)
    for name, answer in grpc_answers.items():
        arrays, parameters = from_grpc(answer)
        same(arrays, uint8 if name == "uint8" else fp32)
        assert parameters == {"passes": refine}, name
        assert answer.model_name == MODEL and answer.model_version == str(shipped_version(MODEL))
    arrays, parameters, binary = from_rest(*rest_answers["json"])
    same(arrays, fp32)
    assert parameters == {"passes": refine} and not any(binary)
    assert rest_answers["json"][1]["Content-Type"].startswith("application/json")
    arrays, parameters, binary = from_rest(*rest_answers["binary"])
    same(arrays, uint8)
    assert parameters == {"passes": refine} and all(binary)
    # The inversion is of these digits: the reconstructions are close to them, and refinement did not lose ground.
    assert np.all(fp32["distance"] <= fp32["encoder_distance"])
    assert np.abs(uint8["images"].astype(int) - pixels).mean() < 60


def test_refine_passes_are_respected(repo):
    async def go():
        async with running(repo) as (server, stub, channel):
            o = ipb_grpc.GRPCInferenceServiceStub(channel)
            pixels = await _digits(stub)
            images = [("images", "UINT8", list(pixels.shape), pixels)]
            got = {}
            for refine in (0, 40, 64):
                answer = await o.ModelInfer(grpc_request(MODEL, images, {"refine": refine}))
                theirs = await stub.Invert(pb.InvertRequest(model=MODEL, pixels=pixels.tobytes(), refine_passes=refine,
                                                            output=pb.OutputOptions(format=pb.RAW_FLOAT32)))  # fmt: skip
                got[refine] = (*from_grpc(answer), *from_ganserve(theirs))
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s:
                plain = from_rest(*await rest(s, MODEL, *rest_body(images)))  # no refine: the encoder alone
            return got, plain

    got, plain = asyncio.run(go())
    for refine, (arrays, parameters, theirs, passes) in got.items():
        # Whole generations of 16 candidates per image: 40 allows two (32 passes).
        assert parameters["passes"] == passes == refine // 16 * 16, refine
        same(arrays, theirs)
    assert np.array_equal(got[0][0]["distance"], got[0][0]["encoder_distance"])
    assert np.all(got[64][0]["distance"] <= got[40][0]["distance"])
    assert np.all(got[64][0]["encoder_distance"] == got[0][0]["encoder_distance"])  # the encoder's z: the same
    assert plain[1] == {"passes": 0} and plain[0]["z"].tobytes() == got[0][0]["z"].tobytes()


def test_listed_outputs_are_answered_in_their_order(repo):
    async def go():
        async with running(repo) as (server, stub, channel):
            o = ipb_grpc.GRPCInferenceServiceStub(channel)
            pixels = await _digits(stub)
            images = [("images", "UINT8", list(pixels.shape), pixels)]
            listed = await o.ModelInfer(grpc_request(MODEL, images, outputs=[("distance", None), ("images", "UINT8"),
                                                                              ("label", "INT64")]))  # fmt: skip
            theirs = await stub.Invert(pb.InvertRequest(model=MODEL, pixels=pixels.tobytes(),
                                                        output=pb.OutputOptions(format=pb.RAW_UINT8)))  # fmt: skip
            outputs = [{"name": "z", "parameters": {"binary_data": True}}, {"name": "label"},
                       {"name": "images", "parameters": {"binary_data": True, "datatype": "UINT8"}}]  # fmt: skip
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s:
                mixed = await rest(s, MODEL, *rest_body(images, outputs=outputs))
                plain_rest = await rest(s, PLAIN, *rest_body([("images", "UINT8", [2, 2, 4, 1], PLAIN_PIXELS)]))
            plain_grpc = await o.ModelInfer(grpc_request(PLAIN, [("images", "UINT8", [2, 2, 4, 1], PLAIN_PIXELS)],
                                                         {"datatype": "UINT8", "refine": 16}))  # fmt: skip
            return listed, theirs, mixed, plain_rest, plain_grpc

    listed, theirs, mixed, plain_rest, plain_grpc = asyncio.run(go())
    uint8, _ = from_ganserve(theirs)
    arrays, parameters = from_grpc(listed)
    same(arrays, uint8, ["distance", "images", "label"])
    assert [t.datatype for t in listed.outputs] == ["FP32", "UINT8", "INT64"] and parameters == {"passes": 0}
    arrays, _, binary = from_rest(*mixed)
    same(arrays, uint8, ["z", "label", "images"])
    assert binary == [True, False, True]  # each output as it asked; JSON numbers for label
    # Unconditional: no label or probabilities; the exact encoder gives each image's own values back as z.
    rest_arrays, rest_parameters, _ = from_rest(*plain_rest)
    grpc_arrays, grpc_parameters = from_grpc(plain_grpc)
    for arrays in (rest_arrays, grpc_arrays):
        assert list(arrays) == ["z", "distance", "encoder_distance", "images"]
        assert np.allclose(arrays["z"], PLAIN_PIXELS.reshape(2, 8) / 255 * 2 - 1, atol=1e-6)
        assert np.all(arrays["encoder_distance"] < 1e-9)
    assert rest_parameters == {"passes": 0} and rest_arrays["images"].shape == (2, 1, 2, 4)  # FP32, [n, C, H, W]
    assert grpc_parameters == {"passes": 16} and np.array_equal(grpc_arrays["images"], PLAIN_PIXELS)


# ---- refusals -------------------------------------------------------------------------------------------------

GOOD = np.zeros((2, 28, 28, 1), np.uint8)


def _images(shape=(2, 28, 28, 1), datatype="UINT8", values=None):
    values = np.zeros(shape, np.uint8) if values is None else values
    return ("images", datatype, list(shape), values)


# name: (model, tensors, parameters, outputs, grpc code, HTTP status, the message's start)
REFUSALS = {
    "wrong_shape": (MODEL, [_images((2, 28, 28, 3))], {}, [], "INVALID_ARGUMENT", 400,
                    "inputs[0].shape: model 'mnist-cdcgan' draws 28×28×1 images: input 'images' is [n, 28, 28, 1]"
                    " (got [2, 28, 28, 3])"),
    "wrong_rank": (MODEL, [_images((2, 784))], {}, [], "INVALID_ARGUMENT", 400,
                   "inputs[0].shape: input 'images' is UINT8 [n, H, W, C] with n >= 1 (got [2, 784])"),
    "no_images": (MODEL, [_images((0, 28, 28, 1))], {}, [], "INVALID_ARGUMENT", 400,
                  "inputs[0].shape: input 'images' is UINT8 [n, H, W, C] with n >= 1 (got [0, 28, 28, 1])"),
    "shape_vs_data": (MODEL, [("images", "UINT8", [2, 28, 28, 1], GOOD[:1])], {}, [], "INVALID_ARGUMENT", 400,
                      "inputs[0]: shape [2, 28, 28, 1] holds 1568 values, the tensor has 784"),
    "wrong_datatype": (MODEL, [_images(datatype="FP32", values=GOOD.astype(np.float32))], {}, [],
                       "INVALID_ARGUMENT", 400, "inputs[0].datatype: input 'images' is UINT8 only"),
    "with_seeds": (MODEL, [_images()], {"seeds": "0-1"}, [], "INVALID_ARGUMENT", 400,
                   "parameters.seeds: does not apply to an images tensor"),
    "with_labels": (MODEL, [_images()], {"labels": "3"}, [], "INVALID_ARGUMENT", 400,
                    "parameters.labels: does not apply to an images tensor"),
    "with_z": (MODEL, [_images(), ("z", "FP32", [2, 100], np.zeros((2, 100), np.float32))], {}, [],
               "INVALID_ARGUMENT", 400, "inputs[1].name: input 'z' does not go with an images tensor"),
    "unknown_output": (MODEL, [_images()], {}, [("z", None), ("logits", None)], "INVALID_ARGUMENT", 400,
                       "outputs[1].name: unknown output 'logits' (outputs of an inversion: z, label, probabilities,"
                       " distance, encoder_distance, images)"),
    "output_twice": (MODEL, [_images()], {}, [("z", None), ("z", None)], "INVALID_ARGUMENT", 400,
                     "outputs[1].name: output 'z' requested twice"),
    "output_datatype": (MODEL, [_images()], {}, [("z", "UINT8")], "INVALID_ARGUMENT", 400,
                        "outputs[0].parameters.datatype: output 'z' is FP32 (got 'UINT8')"),
    "images_datatype": (MODEL, [_images()], {}, [("images", "INT8")], "INVALID_ARGUMENT", 400,
                        "outputs[0].parameters.datatype: 'INT8' is not one of FP32, UINT8"),
    "request_datatype": (MODEL, [_images()], {"datatype": "FP16"}, [], "INVALID_ARGUMENT", 400,
                         "parameters.datatype: 'FP16' is not one of FP32, UINT8"),
    "refine_range": (MODEL, [_images()], {"refine": 20000}, [], "INVALID_ARGUMENT", 400,
                     "parameters.refine: 0, or from 16 (one generation of 16 candidates) to 10,000 (got 20000)"),
    "refine_negative": (MODEL, [_images()], {"refine": -1}, [], "INVALID_ARGUMENT", 400,
                        "parameters.refine: 0, or from 16 (one generation of 16 candidates) to 10,000 (got -1)"),
    "refine_text": (MODEL, [_images()], {"refine": "many"}, [], "INVALID_ARGUMENT", 400,
                    "parameters.refine: an integer (got str)"),
    "refine_generating": (MODEL, [], {"seeds": "0", "refine": 16}, [], "INVALID_ARGUMENT", 400,
                          "parameters.refine: applies to inversion only (an images tensor)"),
    "too_many": (MODEL, [_images((1025, 28, 28, 1))], {}, [], "INVALID_ARGUMENT", 400,
                 "inputs[0]: 1025 images, the limit is 1024"),
    "unconditional_label": (PLAIN, [_images((1, 2, 4, 1))], {}, [("label", None)], "INVALID_ARGUMENT", 400,
                            "outputs[0].name: model 'inv-plain' is unconditional: it has no label"),
    "unknown_model": ("nope", [_images()], {}, [], "NOT_FOUND", 404, "{model}: no model named 'nope'"),
    # Well formed, but the version serves no inversion: FAILED_PRECONDITION, which HTTP answers with 400.
    "no_encoder": ("plain", [_images((1, 2, 4, 1))], {}, [], "FAILED_PRECONDITION", 400,
                   "{model}: 'plain' version 1 serves no inversion: no encoder.onnx lies beside its model.onnx"),
}  # fmt: skip


def test_bad_input_is_refused_naming_the_field_on_both_wires(repo):
    async def go():
        got = {}
        async with running(repo) as (server, _stub, channel):
            o = ipb_grpc.GRPCInferenceServiceStub(channel)
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s:
                for name, (model, tensors, parameters, outputs, *_) in REFUSALS.items():
                    try:
                        await o.ModelInfer(grpc_request(model, tensors, parameters, outputs))
                        got[f"grpc_{name}"] = ("OK", "")
                    except grpc.aio.AioRpcError as e:
                        got[f"grpc_{name}"] = (e.code().name, e.details())
                    listed = [{"name": n} | ({"parameters": {"datatype": d}} if d else {}) for n, d in outputs]
                    status, _, body = await rest(s, model, *rest_body(tensors, parameters, listed or None))
                    got[f"rest_{name}"] = (status, json.loads(body).get("error", ""))
                # What a wire reads itself: UINT8 values past a byte.
                bad = np.full((1, 28, 28, 1), 300)
                try:
                    await o.ModelInfer(grpc_request(MODEL, [_images((1, 28, 28, 1), values=bad)], typed=True))
                    got["grpc_past_a_byte"] = ("OK", "")
                except grpc.aio.AioRpcError as e:
                    got["grpc_past_a_byte"] = (e.code().name, e.details())
                for tag, values in (("past_a_byte", bad), ("not_integers", np.full((1, 28, 28, 1), 0.5))):
                    body, headers = rest_body([_images((1, 28, 28, 1), values=values)], binary=False)
                    status, _, answer = await rest(s, MODEL, body, headers)
                    got[f"rest_{tag}"] = (status, json.loads(answer).get("error", ""))
        return got

    got = asyncio.run(go())
    for name, (*_, code, status, text) in REFUSALS.items():
        grpc_code, grpc_message = got[f"grpc_{name}"]
        assert grpc_code == code and grpc_message.startswith(text.format(model="model_name")), (
            name,
            got[f"grpc_{name}"],
        )
        rest_status, rest_message = got[f"rest_{name}"]
        assert rest_status == status and rest_message.startswith(text.format(model="model")), (
            name,
            got[f"rest_{name}"],
        )
    assert got["grpc_past_a_byte"] == (
        "INVALID_ARGUMENT", "inputs[0].contents.uint_contents: UINT8 values are 0 to 255 (got 300)"
    )  # fmt: skip
    for tag in ("past_a_byte", "not_integers"):
        assert got[f"rest_{tag}"][0] == 400
        assert got[f"rest_{tag}"][1].startswith("inputs[0].data: must hold integers from 0 to 255 only"), tag


# ---- the wire-neutral pieces, and what Triton's clients read --------------------------------------------------


def test_metadata_says_which_versions_invert(repo):
    async def go():
        async with running(repo) as (server, _stub, channel):
            o = ipb_grpc.GRPCInferenceServiceStub(channel)
            grpc_meta = {m: await o.ModelMetadata(ipb.ModelMetadataRequest(name=m)) for m in (MODEL, "plain")}
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s:
                rest_meta = {}
                for m in (MODEL, "plain"):
                    async with s.get(f"/v2/models/{m}") as r:
                        rest_meta[m] = await r.json()
            return grpc_meta, rest_meta

    grpc_meta, rest_meta = asyncio.run(go())
    for model, invertible in ((MODEL, True), ("plain", False)):
        assert grpc_meta[model].parameters["invertible"].bool_param is invertible
        assert rest_meta[model]["parameters"]["invertible"] is invertible
        # Still generation's tensors, as Triton's clients read them: z (and y) in, images out.
        assert [t["name"] for t in rest_meta[model]["outputs"]] == ["images"]
        assert [t["name"] for t in rest_meta[model]["inputs"]] == (["z", "y"] if model == MODEL else ["z"])


def test_a_generation_answer_is_one_images_tensor_without_parameters():
    drawn = dm.Result("m", 1, dm.Format.UINT8, np.zeros((2, 3, 4, 1), np.uint8), image_shape=(3, 4, 1))
    result = oip.outcome(drawn, (oip.Requested("images", "UINT8"),))
    assert [(t.name, t.datatype, t.shape) for t in result.outputs] == [("images", "UINT8", [2, 3, 4, 1])]
    assert result.parameters == {}


TRITON = """
import json, sys
import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th
grpc_url, http_url, out = sys.argv[1:4]
pixels = np.load(out + ".in.npy")
results, passes = {}, {}
for tag, mod, client in (("grpc", tg, tg.InferenceServerClient(grpc_url)), ("http", th, th.InferenceServerClient(http_url))):
    images = mod.InferInput("images", list(pixels.shape), "UINT8")
    images.set_data_from_numpy(pixels)
    answer = client.infer("mnist-cdcgan", [images], parameters={"refine": 32, "datatype": "UINT8"})
    for name in ("z", "label", "probabilities", "distance", "encoder_distance", "images"):
        results[f"{tag}_{name}"] = answer.as_numpy(name)
    response = answer.get_response()
    passes[tag] = response.parameters["passes"].int64_param if mod is tg else response["parameters"]["passes"]
np.savez(out, **results)
print(json.dumps(passes))
"""


def test_triton_clients_invert(repo, tmp_path):
    """Triton's own clients (in another process: their protobuf package clashes with ours) read every output."""
    out = tmp_path / "triton.npz"

    async def go():
        async with running(repo) as (server, stub, _):
            pixels = await _digits(stub)
            np.save(str(out) + ".in.npy", pixels)
            theirs = await stub.Invert(pb.InvertRequest(model=MODEL, pixels=pixels.tobytes(), refine_passes=32,
                                                        output=pb.OutputOptions(format=pb.RAW_UINT8)))  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", TRITON, f"127.0.0.1:{server.port}", f"127.0.0.1:{server.http_port}", str(out),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, stderr.decode()[-3000:]
            return theirs, json.loads(stdout)

    theirs, passes = asyncio.run(go())
    expected, _ = from_ganserve(theirs)
    assert passes == {"grpc": 32, "http": 32}
    with np.load(out) as f:
        for tag in ("grpc", "http"):
            same({name: f[f"{tag}_{name}"] for name in ALL}, expected)


def test_priority_one_inversions_run_first(tmp_path):
    """Behind a held batch, two normal inversions and then two priority-1 ones queue; the model takes the urgent ones
    first. (Each inversion runs the model twice, for the encoder's z and for the reconstruction; a second pass queues
    when the first is back, so only the order of the first passes is the queue's.)"""
    from testkit.gated import Gate, sessions
    from testkit.servefix import echo_encoder, echo_model
    from testkit.waiting import until

    echo_model(tmp_path / "m" / "1" / "model.onnx")
    echo_encoder(tmp_path / "m" / "1")
    hold = Gate()
    ran: list[float] = []  # z[0, 0] of each batch, in the order the model ran them

    def model_runs(feeds) -> None:
        ran.append(round(float(feeds["z"][0, 0]), 3))
        hold.wait()

    def pixels(first: int) -> np.ndarray:  # an echo image whose z[0] reads back as (first / 255) * 2 - 1
        image = np.zeros((1, 2, 4, 1), np.uint8)
        image[0, 0, 0, 0], image[0, 1, 1, 0] = first, 255  # y = eel: a one-hot's last entry
        return image

    cases = [("normal", 0, 40), ("normal", 2, 80), ("urgent", 1, 120), ("urgent", 1, 160)]

    async def go():
        flags = {"max_batch_size": 1, "batch_workers": 1}
        async with running(tmp_path, session_factory=sessions(m=model_runs), **flags) as (server, _stub, channel):
            stub = ipb_grpc.GRPCInferenceServiceStub(channel)

            async def call(first: int, priority: int):
                image = pixels(first)
                tensor = ipb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=image.shape)
                return await stub.ModelInfer(ipb.ModelInferRequest(
                    model_name="m", inputs=[tensor], raw_input_contents=[image.tobytes()],
                    parameters={"priority": P(int64_param=priority)},
                ))  # fmt: skip

            batcher = server.registry.models["m"][1].batcher
            calls = [asyncio.ensure_future(call(0, 0))]
            await until(lambda: hold.waiting == 1)
            for i, (_, priority, first) in enumerate(cases):
                calls.append(asyncio.ensure_future(call(first, priority)))
                await until(lambda i=i: batcher.queue_depth == i + 1)
            hold.open()
            await asyncio.gather(*calls)

    asyncio.run(go())
    tag = {round(first / 255 * 2 - 1, 3): kind for kind, _, first in cases}
    firsts = [tag[z] for z in dict.fromkeys(ran) if z in tag]  # each call's first pass; the held call's (z[0] -1) aside
    assert firsts == ["urgent", "urgent", "normal", "normal"], ran
