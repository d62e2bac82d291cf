"""The Open Inference Protocol over gRPC and REST: Triton's real clients, our own stubs, and the wire contract."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.api.inference import grpc_predict_v2_pb2 as ipb
from service.api.inference import grpc_predict_v2_pb2_grpc as ipb_grpc
from testkit.process import ROOT, shipped_version, start_server
from testkit.servefix import echo_model, plain_model, running

MODEL = "mnist-cdcgan"
P = ipb.InferParameter


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """Triton's clients, in their own process, against `python -m service` on the shipped model."""
    tmp = tmp_path_factory.mktemp("oip")
    env = {"GAN_PORT": "0", "GAN_HTTP_PORT": "0", "GAN_METRICS_PORT": "-1", "GAN_HOST": "127.0.0.1"}
    proc, ready = start_server(["--model-repository", str(ROOT / "models")], env, tmp)
    try:
        out = str(tmp / "results.npz")
        run = subprocess.run(
            [sys.executable, str(ROOT / "testkit" / "oip_clients.py"), f"127.0.0.1:{ready['port']}",
             f"127.0.0.1:{ready['http_port']}", out],
            capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        channel = grpc.insecure_channel(f"127.0.0.1:{ready['port']}")
        stub = pb_grpc.GeneratorStub(channel)
        ours = {
            fmt: stub.Generate(pb.GenerateRequest(
                model=MODEL, seed_range=pb.SeedRange(start=0, count=8), labels=[pb.Label(index=3)],
                output=pb.OutputOptions(format=fmt)), timeout=30)
            for fmt in (pb.RAW_FLOAT32, pb.RAW_UINT8)
        }  # fmt: skip
        with np.load(out) as f:
            results = dict(f)
        rows = pb.LatentRows(values=results["z"].ravel())
        labels = [pb.Label(soft=pb.SoftLabel(weights=row)) for row in results["y"]]
        ours["edit"] = stub.Edit(pb.EditRequest(
            model=MODEL, seed_range=pb.SeedRange(start=0, count=8), labels=[pb.Label(index=3)], direction="slant",
            strengths=[-2, 0, 2], output=pb.OutputOptions(format=pb.RAW_UINT8)), timeout=30)  # fmt: skip
        ours["rows"] = stub.Generate(
            pb.GenerateRequest(model=MODEL, rows=rows, labels=labels, output=pb.OutputOptions(format=pb.RAW_FLOAT32)),
            timeout=30,
        )
        channel.close()
        yield results, json.loads(Path(out + ".json").read_text()), ours
    finally:
        proc.terminate()
        proc.wait(30)


def test_triton_clients_read_health_and_metadata(triton):
    _, report, _ = triton
    meta = report["meta"]
    assert all(meta[k] is True for k in ("grpc_live", "grpc_ready", "http_live", "http_ready"))
    assert meta["grpc_model_ready"] is meta["http_model_ready"] is True
    assert meta["grpc_unknown_ready"] is meta["http_unknown_ready"] is False
    assert meta["http_server"]["name"] == meta["grpc_server"]["name"] == "gan-serve"
    for model in (meta["grpc_model"], meta["http_model"]):
        tensors = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in model["inputs"] + model["outputs"]}
        assert tensors == {"z": ("FP32", [-1, 100]), "y": ("FP32", [-1, 10]), "images": ("FP32", [-1, 1, 28, 28])}
        assert model["versions"] == [str(shipped_version())] and model["platform"] == "onnxruntime_onnx"


def test_the_same_seeds_give_the_same_bytes_through_every_api(triton):
    results, _, ours = triton
    fp32 = np.frombuffer(b"".join(ours[pb.RAW_FLOAT32].images), "<f4").reshape(8, 1, 28, 28)
    uint8 = np.frombuffer(b"".join(ours[pb.RAW_UINT8].images), np.uint8).reshape(8, 28, 28, 1)
    for tag in ("grpc", "http"):
        assert (
            results[f"{tag}_seeds_fp32"].dtype == np.float32
            and results[f"{tag}_seeds_fp32"].tobytes() == fp32.tobytes()
        )
        assert (
            results[f"{tag}_seeds_uint8"].dtype == np.uint8
            and results[f"{tag}_seeds_uint8"].tobytes() == uint8.tobytes()
        )
    assert results["http_seeds_uint8_json"].tobytes() == uint8.tobytes()  # JSON numbers, not the binary extension
    assert 0.05 < (uint8 > 128).mean() < 0.4  # digits, not a blank


def test_explicit_z_and_y_tensors_match_ganserve_rows(triton):
    results, _, ours = triton
    expected = b"".join(ours["rows"].images)
    for name in ("grpc_tensors", "http_tensors", "http_tensors_json"):
        assert results[name].shape == (3, 1, 28, 28) and results[name].tobytes() == expected, name


def test_triton_clients_edit_as_ganserve_does(triton):
    results, _, ours = triton
    expected = b"".join(ours["edit"].images)  # 8 seeds × 3 strengths, seed by seed
    for tag in ("grpc", "http"):
        assert results[f"{tag}_edit"].shape == (24, 28, 28, 1) and results[f"{tag}_edit"].tobytes() == expected, tag


@pytest.mark.parametrize(
    ("case", "grpc_status", "http_status", "text"),
    [
        ("unknown_model", "StatusCode.NOT_FOUND", "404", "no model named 'nope'"),
        ("bad_direction", "StatusCode.INVALID_ARGUMENT", "400", "parameters.direction: unknown direction 'tilt'"),
        ("wrong_shape", "StatusCode.INVALID_ARGUMENT", "400", "inputs[0].shape: input 'z' is [n, 100] (got [2, 3])"),
        ("wrong_datatype", "StatusCode.INVALID_ARGUMENT", "400", "inputs[0].datatype: input 'z' is FP32 (got 'INT64')"),
        ("bad_seeds", "StatusCode.INVALID_ARGUMENT", "400", "parameters.seeds: '0-x' is not seeds"),
        (
            "too_many",
            "StatusCode.INVALID_ARGUMENT",
            "400",
            "parameters.seeds: 100000 requested, the limit per request is 1024",
        ),
    ],
)
def test_triton_clients_get_clear_errors(triton, case, grpc_status, http_status, text):
    errors = triton[1]["errors"]
    assert errors[f"grpc_{case}"]["status"] == grpc_status and text in errors[f"grpc_{case}"]["message"]
    assert errors[f"http_{case}"]["status"] == http_status and text in errors[f"http_{case}"]["message"]


# ---- our own stubs: what Triton's client cannot send -------------------------------------------------------------


def infer(**fields) -> ipb.ModelInferRequest:
    return ipb.ModelInferRequest(**fields)


def test_output_parameter_typed_contents_and_refusals(tmp_path):
    echo_model(tmp_path / "echo" / "1" / "model.onnx")
    plain_model(tmp_path / "plain" / "1" / "model.onnx")
    uint8 = ipb.ModelInferRequest.InferRequestedOutputTensor(
        name="images", parameters={"datatype": P(string_param="UINT8")}
    )
    z = ipb.ModelInferRequest.InferInputTensor

    async def go():
        async with running(tmp_path) as (_server, stub, channel):
            o = ipb_grpc.GRPCInferenceServiceStub(channel)
            seeds = {"seeds": P(string_param="4,9"), "labels": P(string_param="cat")}
            by_output = await o.ModelInfer(infer(model_name="echo", parameters=seeds, outputs=[uint8]))
            ours = await stub.Generate(pb.GenerateRequest(model="echo", seeds=pb.SeedList(seeds=[4, 9]),
                                                          labels=[pb.Label(name="cat")], output=pb.OutputOptions(format=pb.RAW_UINT8)))  # fmt: skip
            values = np.linspace(-1, 1, 2 * 8, dtype=np.float32)
            typed = await o.ModelInfer(
                infer(
                    model_name="plain",
                    inputs=[
                        z(
                            name="z",
                            datatype="FP32",
                            shape=[2, 8],
                            contents=ipb.InferTensorContents(fp32_contents=values),
                        )
                    ],
                )
            )
            raw = await o.ModelInfer(infer(model_name="plain", inputs=[z(name="z", datatype="FP32", shape=[2, 8])],
                                           raw_input_contents=[values.tobytes()]))  # fmt: skip
            refusals = {}
            for name, request in {
                "both": infer(model_name="plain", inputs=[z(name="z", datatype="FP32", shape=[1, 8],
                              contents=ipb.InferTensorContents(fp32_contents=values[:8]))], raw_input_contents=[b"\0" * 32]),
                "ragged_raw": infer(model_name="plain", inputs=[z(name="z", datatype="FP32", shape=[1, 8])],
                                    raw_input_contents=[b"\0" * 19]),
                "unknown_input": infer(model_name="plain", inputs=[z(name="w", datatype="FP32", shape=[1, 8])]),
                "unknown_parameter": infer(model_name="plain", parameters={"sed": P(int64_param=1)}),
                "unknown_output": infer(model_name="plain", parameters={"seeds": P(int64_param=1)},
                                        outputs=[ipb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
                "y_unconditional": infer(model_name="plain", inputs=[
                    z(name="z", datatype="FP32", shape=[1, 8], contents=ipb.InferTensorContents(fp32_contents=values[:8])),
                    z(name="y", datatype="FP32", shape=[1, 3], contents=ipb.InferTensorContents(fp32_contents=[1, 0, 0]))]),
                "bad_label": infer(model_name="echo", parameters={"seeds": P(int64_param=1), "labels": P(string_param="emu")}),
                "bad_truncation": infer(model_name="plain", parameters={"seeds": P(int64_param=1), "truncation": P(double_param=2.0)}),
                "bad_version": infer(model_name="plain", model_version="v1", parameters={"seeds": P(int64_param=1)}),
                "missing_version": infer(model_name="plain", model_version="7", parameters={"seeds": P(int64_param=1)}),
            }.items():  # fmt: skip
                try:
                    await o.ModelInfer(request)
                    refusals[name] = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as e:
                    refusals[name] = (e.code(), e.details())
            ready = [await o.ModelReady(ipb.ModelReadyRequest(name=n, version=v)) for n, v in
                     (("plain", ""), ("plain", "1"), ("plain", "2"), ("nope", ""))]  # fmt: skip
            return by_output, ours, typed, raw, refusals, [r.ready for r in ready]

    by_output, ours, typed, raw, refusals, ready = asyncio.run(go())
    assert by_output.outputs[0].datatype == "UINT8" and list(by_output.outputs[0].shape) == [2, 2, 4, 1]
    assert by_output.raw_output_contents[0] == b"".join(ours.images)
    assert typed.raw_output_contents == raw.raw_output_contents and typed.outputs[0].datatype == "FP32"
    assert ready == [True, True, False, False]
    bad = grpc.StatusCode.INVALID_ARGUMENT
    expected = {
        "both": (bad, "inputs[0].contents: give values in contents or raw_input_contents, not both"),
        "ragged_raw": (bad, "raw_input_contents[0]: 19 bytes is not whole FP32 values"),
        "unknown_input": (bad, "inputs[0].name: unknown input 'w' (inputs: z, y)"),
        "unknown_parameter": (bad, "parameters: unknown parameter 'sed'"),
        "unknown_output": (bad, "outputs[0].name: unknown output 'logits' (outputs: images)"),
        "y_unconditional": (bad, "inputs[1]: model 'plain' is unconditional and takes no y"),
        "bad_label": (bad, "parameters.labels: unknown class 'emu'"),
        "bad_truncation": (bad, "parameters.truncation: must be in (0, 1]"),
        "bad_version": (bad, "model_version: 'v1' is not a version number"),
        "missing_version": (grpc.StatusCode.NOT_FOUND, "model_version: model 'plain' has no version 7"),
    }
    for name, (code, text) in expected.items():
        assert refusals[name][0] == code and refusals[name][1].startswith(text), (name, refusals[name])


def test_the_proto_matches_triton_s_on_every_shared_field():
    """Wire compatibility, field by field, against the proto tritonclient was built with (in another process)."""
    script = """
import json, tritonclient.grpc.service_pb2 as t
def walk(d, prefix=""):
    out = {}
    for f in d.fields:
        out[prefix + d.name + "." + f.name] = [f.number, f.type, f.is_repeated]
    for n in d.nested_types:
        out.update(walk(n, prefix + d.name + "."))
    return out
found = {}
for d in t.DESCRIPTOR.message_types_by_name.values():
    found.update(walk(d))
service = t.DESCRIPTOR.services_by_name["GRPCInferenceService"]
found["rpc"] = {m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods}
print(json.dumps(found))
"""
    theirs = json.loads(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    )
    ours: dict = {}

    def walk(d, prefix=""):
        for f in d.fields:
            ours[prefix + d.name + "." + f.name] = [f.number, f.type, f.is_repeated]
        for n in d.nested_types:
            walk(n, prefix + d.name + ".")

    for d in ipb.DESCRIPTOR.message_types_by_name.values():
        walk(d)
    shared = set(ours) & set(theirs)
    assert len(shared) > 60
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
    service = ipb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for m in service.methods:
        assert theirs["rpc"][m.name] == [m.input_type.full_name, m.output_type.full_name]
    # Only the two metadata parameter maps are ours alone: every other field is Triton's too.
    assert set(ours) - set(theirs) == {"ModelMetadataResponse.parameters", "ModelMetadataResponse.TensorMetadata.parameters"} | {
        k for k in ours if k.startswith(("ModelMetadataResponse.ParametersEntry.", "ModelMetadataResponse.TensorMetadata.ParametersEntry."))
    }  # fmt: skip
