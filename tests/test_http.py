"""HTTP on a real in-process server: OIP REST, PNG endpoints, metrics, tokens, TLS and the drain."""

from __future__ import annotations

import asyncio
import io
import json
import ssl

import aiohttp
import numpy as np
import pytest
from PIL import Image

from service.api.ganserve.v1 import generator_pb2 as pb
from testkit.certs import CA
from testkit.gated import Gate, sessions
from testkit.servefix import echo_model, plain_model, running
from testkit.tokens import ADMIN, READER, write_tokens
from testkit.waiting import until


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    echo_model(root / "echo" / "1" / "model.onnx")
    plain_model(root / "plain" / "1" / "model.onnx")
    plain_model(root / "slow" / "1" / "model.onnx")  # slow where a test gates its runs (testkit.gated)
    return root


async def fetch(session: aiohttp.ClientSession, method: str, url: str, **kwargs) -> tuple[int, dict, bytes]:
    async with session.request(method, url, **kwargs) as r:
        return r.status, dict(r.headers), await r.read()


def test_rest_endpoints_and_their_errors(repo):
    async def go():
        async with (
            running(repo) as (server, stub, _),
            aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s,
        ):
            got = {
                "live": await fetch(s, "GET", "/v2/health/live"),
                "ready": await fetch(s, "GET", "/v2/health/ready"),
                "server": await fetch(s, "GET", "/v2"),
                "meta": await fetch(s, "GET", "/v2/models/echo"),
                "meta_v1": await fetch(s, "GET", "/v2/models/echo/versions/1"),
                "meta_v9": await fetch(s, "GET", "/v2/models/echo/versions/9"),
                "model_ready": await fetch(s, "GET", "/v2/models/echo/versions/1/ready"),
                "model_unready": await fetch(s, "GET", "/v2/models/nope/ready"),
                "infer": await fetch(s, "POST", "/v2/models/echo/infer", json={
                    "id": "a1", "parameters": {"seeds": "3,4", "labels": "dog"},
                    "outputs": [{"name": "images", "parameters": {"datatype": "UINT8"}}]}),
                "infer_z": await fetch(s, "POST", "/v2/models/plain/versions/1/infer", json={
                    "inputs": [{"name": "z", "datatype": "FP32", "shape": [2, 8], "data": [[0.5] * 8, [-0.25] * 8]}]}),
                "malformed": await fetch(s, "POST", "/v2/models/echo/infer", data=b'{"inputs": [', headers={"Content-Type": "application/json"}),
                "not_object": await fetch(s, "POST", "/v2/models/echo/infer", json=[1, 2]),
                "wrong_shape": await fetch(s, "POST", "/v2/models/plain/infer", json={
                    "inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}),
                "shape_vs_data": await fetch(s, "POST", "/v2/models/plain/infer", json={
                    "inputs": [{"name": "z", "datatype": "FP32", "shape": [2, 8], "data": [0.0] * 8}]}),
                "wrong_datatype": await fetch(s, "POST", "/v2/models/plain/infer", json={
                    "inputs": [{"name": "z", "datatype": "INT32", "shape": [1, 8], "data": [0] * 8}]}),
                "not_numbers": await fetch(s, "POST", "/v2/models/plain/infer", json={
                    "inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 8], "data": ["a"] * 8}]}),
                "unknown_model": await fetch(s, "POST", "/v2/models/nope/infer", json={"parameters": {"seeds": "1"}}),
                "bad_query": await fetch(s, "GET", "/v1/models/echo/images.png?seeds=1&colour=red"),
                "bad_psi": await fetch(s, "GET", "/v1/models/echo/images.png?seeds=1&label=cat&psi=2"),
                "bad_label": await fetch(s, "GET", "/v1/models/echo/images.png?seeds=1&label=emu"),
                "no_label": await fetch(s, "GET", "/v1/models/echo/images.png?seeds=1"),
                "bad_soft": await fetch(s, "GET", "/v1/models/echo/images.png?seeds=1&soft=1,2"),
                "one_end": await fetch(s, "GET", "/v1/models/echo/interpolation.png?from_label=1"),
                "bad_to_soft": await fetch(s, "GET", "/v1/models/echo/interpolation.png?from_label=1&to_soft=0,0,0"),
                "latest": await fetch(s, "GET", "/v1/models/echo/images.png?seeds=1&label=1&version="),
                "no_route": await fetch(s, "GET", "/v2/nothing/here"),
                "wrong_method": await fetch(s, "GET", "/v2/models/echo/infer"),
            }  # fmt: skip
            ours = await stub.Generate(pb.GenerateRequest(model="echo", seeds=pb.SeedList(seeds=[3, 4]),
                                                          labels=[pb.Label(name="dog")], output=pb.OutputOptions(format=pb.RAW_UINT8)))  # fmt: skip
            return got, ours

    got, ours = asyncio.run(go())
    ok = {k: json.loads(got[k][2]) for k in ("live", "ready", "server", "meta", "meta_v1", "infer", "infer_z")}
    assert got["live"][0] == got["ready"][0] == 200 and ok["ready"] == {"ready": True}
    assert ok["server"]["name"] == "gan-serve" and "binary_tensor_data" in ok["server"]["extensions"]
    assert ok["meta"] == ok["meta_v1"] and [t["name"] for t in ok["meta"]["inputs"]] == ["z", "y"]
    assert ok["meta"]["parameters"]["class_names"] == "cat,dog,eel"
    assert got["meta_v9"][0] == 404 and json.loads(got["meta_v9"][2])["error"].startswith(
        "version: model 'echo' has no version 9"
    )
    assert got["model_ready"][0] == 200 and got["model_unready"][0] == 503
    assert got["latest"][0] == 200 and got["latest"][1]["X-Model-Version"] == "1"  # an empty version: the latest
    infer = ok["infer"]
    assert infer["id"] == "a1" and infer["model_version"] == "1" and infer["outputs"][0]["shape"] == [2, 2, 4, 1]
    assert bytes(infer["outputs"][0]["data"]) == b"".join(ours.images)  # the same bytes as ganserve.v1
    assert float(got["infer"][1]["Server-Timing"].split("dur=")[1]) > 0
    z_out = ok["infer_z"]["outputs"][0]
    assert z_out["datatype"] == "FP32" and z_out["shape"] == [2, 1, 2, 4] and len(z_out["data"]) == 16
    errors = {
        "malformed": (400, "request: the body is not valid JSON"),
        "not_object": (400, "request: the body must be a JSON object"),
        "wrong_shape": (400, "inputs[0].shape: input 'z' is [n, 8] (got [1, 3])"),
        "shape_vs_data": (400, "inputs[0]: shape [2, 8] holds 16 values, the tensor has 8"),
        "wrong_datatype": (400, "inputs[0].datatype: input 'z' is FP32 (got 'INT32')"),
        "not_numbers": (400, "inputs[0].data: must hold numbers only"),
        "unknown_model": (404, "model: no model named 'nope'"),
        "bad_query": (400, "query: unknown parameter 'colour'"),
        "bad_psi": (400, "psi: must be in (0, 1]"),
        "bad_label": (400, "label: unknown class 'emu'"),
        "no_label": (400, "label: model 'echo' is conditional: give a class index, a name or soft weights"),
        "bad_soft": (400, "soft: expected 3 weights, got 2"),
        "one_end": (400, "to_label: give a label for every keyframe or for none"),
        "bad_to_soft": (400, "to_soft: weights must be finite, non-negative and not all zero"),
        "no_route": (404, "Not Found"),
        "wrong_method": (405, "Method Not Allowed"),
    }
    for name, (status, text) in errors.items():
        code, headers, body = got[name]
        assert code == status and headers["Content-Type"].startswith("application/json"), (name, code, body)
        assert json.loads(body)["error"].startswith(text), (name, body)
        assert b"Traceback" not in body


def test_binary_tensor_extension_in_and_out(repo):
    z = np.linspace(-1, 1, 16, dtype=np.float32)
    head = json.dumps({
        "inputs": [{"name": "z", "datatype": "FP32", "shape": [2, 8], "parameters": {"binary_data_size": 64}}],
        "outputs": [{"name": "images", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip

    async def go():
        async with (
            running(repo) as (server, stub, _),
            aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s,
        ):
            headers = {"Inference-Header-Content-Length": str(len(head))}
            good = await fetch(s, "POST", "/v2/models/plain/infer", data=head + z.tobytes(), headers=headers)
            short = await fetch(s, "POST", "/v2/models/plain/infer", data=head + z.tobytes()[:60], headers=headers)
            extra = await fetch(
                s, "POST", "/v2/models/plain/infer", data=head + z.tobytes() + b"\0" * 8, headers=headers
            )
            lying = await fetch(
                s, "POST", "/v2/models/plain/infer", data=head, headers={"Inference-Header-Content-Length": "99999"}
            )
            ours = await stub.Generate(pb.GenerateRequest(model="plain", rows=pb.LatentRows(values=z), output=pb.OutputOptions(format=pb.RAW_FLOAT32)))  # fmt: skip
            return good, short, extra, lying, ours

    good, short, extra, lying, ours = asyncio.run(go())
    status, headers, body = good
    split = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:split])
    assert status == 200 and answer["outputs"][0]["parameters"]["binary_data_size"] == 64
    assert body[split:] == b"".join(ours.images)
    assert short[0] == 400 and b"binary_data_size: past the end" in short[2]
    assert extra[0] == 400 and b"8 bytes after the JSON belong to no input" in extra[2]
    assert lying[0] == 400 and b"Inference-Header-Content-Length: '99999' is not a length" in lying[2]


def test_png_endpoints_decode_to_the_images_ganserve_draws(repo):
    async def go():
        async with (
            running(repo) as (server, stub, _),
            aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s,
        ):
            grid = await fetch(s, "GET", "/v1/models/echo/images.png?seeds=0-5&label=1&psi=0.5&columns=3")
            soft = await fetch(s, "GET", "/v1/models/echo/images.png?seeds=0&soft=1,0,1")
            strip = await fetch(
                s, "GET", "/v1/models/echo/interpolation.png?from=3&to=9&steps=4&from_label=cat&to_label=eel"
            )
            models = await fetch(s, "GET", "/v1/models")
            ours = await stub.Generate(pb.GenerateRequest(
                model="echo", seed_range=pb.SeedRange(start=0, count=6), labels=[pb.Label(index=1)], truncation=0.5,
                output=pb.OutputOptions(grid=True, grid_columns=3, grid_only=True)))  # fmt: skip
            return grid, soft, strip, models, ours

    grid, soft, strip, models, ours = asyncio.run(go())
    assert grid[0] == 200 and grid[1]["Content-Type"] == "image/png" and grid[1]["X-Model-Version"] == "1"
    assert grid[2] == ours.grid_png
    pixels = np.asarray(Image.open(io.BytesIO(grid[2])))
    assert pixels.shape == (2 * (2 + 2) + 2, 3 * (4 + 2) + 2) and pixels.std() > 0
    # echo's image shows its label: the soft blend of classes 0 and 2 puts half weight on each.
    tile = np.asarray(Image.open(io.BytesIO(soft[2])))[2:4, 2:6].ravel()
    assert soft[0] == 200 and tile[5:8].tolist() == [191, 128, 191]  # y = (0.5, 0, 0.5) → (0.5 + 1) / 2 · 255
    frames = np.asarray(Image.open(io.BytesIO(strip[2])))
    assert strip[0] == 200 and frames.shape == (2 + 4, 5 * (4 + 2) + 2)
    listed = json.loads(models[2])["models"]
    assert {m["name"] for m in listed} == {"echo", "plain", "slow"}
    assert next(m for m in listed if m["name"] == "echo")["class_names"] == ["cat", "dog", "eel"]


def test_metrics_count_http_and_oip_calls_by_method(repo):
    async def go():
        async with running(repo) as (server, _, _), aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s:
            await fetch(s, "GET", "/v1/models/plain/images.png?seeds=1")
            await fetch(s, "POST", "/v2/models/plain/infer", json={"parameters": {"seed_start": 0, "count": 2}})
            await fetch(s, "POST", "/v2/models/plain/infer", json={"parameters": {"count": -1}})
            return (await fetch(s, "GET", "/metrics"))[2].decode()

    text = asyncio.run(go())
    assert 'gan_requests_total{code="OK",method="http.images",model="plain"} 1.0' in text
    assert 'gan_requests_total{code="OK",method="http.infer",model="plain"} 1.0' in text
    assert 'gan_requests_total{code="INVALID_ARGUMENT",method="http.infer",model="plain"} 1.0' in text
    assert 'gan_images_generated_total{model="plain"} 3.0' in text  # the same batchers and counters as gRPC


def test_tokens_and_mutual_tls_guard_http_as_they_guard_grpc(repo, tmp_path):
    ca = CA(tmp_path, "http")
    server_pair, client_pair = ca.issue("server"), ca.issue("client", client=True)
    tokens = write_tokens(tmp_path / "tokens", {"reader": ("infer", READER), "ops": ("admin", ADMIN)})
    flags = {"tls_cert": str(server_pair.cert), "tls_key": str(server_pair.key), "tls_client_ca": str(ca.pem),
             "auth_tokens_file": str(tokens)}  # fmt: skip
    trusted = ssl.create_default_context(cafile=str(ca.pem))
    trusted.load_cert_chain(client_pair.cert, client_pair.key)
    no_cert = ssl.create_default_context(cafile=str(ca.pem))

    async def go():
        async with running(repo, **flags) as (server, _, _):
            base = f"https://localhost:{server.http_port}"
            async with aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(ssl=trusted)) as s:
                got = {
                    "health": await fetch(s, "GET", "/v2/health/ready"),
                    "none": await fetch(s, "GET", "/v2/models/plain"),
                    "wrong": await fetch(s, "GET", "/v2/models/plain", headers={"Authorization": "Bearer not-a-token-0123456789"}),
                    "reader": await fetch(s, "GET", "/v2/models/plain", headers={"Authorization": f"Bearer {READER}"}),
                    "metrics": await fetch(s, "GET", "/metrics"),
                }  # fmt: skip
            async with aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(ssl=no_cert)) as s:
                try:
                    await fetch(s, "GET", "/v2/health/live")
                    got["no_client_cert"] = "answered"
                except aiohttp.ClientError as e:
                    got["no_client_cert"] = type(e).__name__
            return got

    got = asyncio.run(go())
    assert got["health"][0] == 200  # probes stay open, as grpc.health.v1 does
    assert got["none"][0] == 401 and got["none"][1]["WWW-Authenticate"] == "Bearer"
    assert json.loads(got["none"][2])["error"].startswith("authorization: no token")
    assert got["wrong"][0] == 401 and b"not-a-token" not in got["wrong"][2]  # never echoed
    assert got["reader"][0] == 200 and got["metrics"][0] == 401
    assert got["no_client_cert"] != "answered"


def test_a_drain_finishes_http_calls_and_refuses_new_ones(repo):
    gate = Gate()

    async def go():
        async with (
            running(repo, session_factory=sessions(slow=gate.wait)) as (server, _, _),
            aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s,
        ):
            slow = asyncio.ensure_future(fetch(s, "GET", "/v1/models/slow/images.png?seeds=0-255"))
            await gate.reached()  # in flight when the drain begins: held inside the model
            stop = asyncio.ensure_future(server.stop(grace=10))
            await until(lambda: server.gate.draining)
            late = await fetch(s, "GET", "/v1/models/plain/images.png?seeds=1")
            ready = await fetch(s, "GET", "/v2/health/ready")
            gate.open()
            done = await slow
            await stop
            return done, late, ready

    done, late, ready = asyncio.run(go())
    assert done[0] == 200 and Image.open(io.BytesIO(done[2])).size[0] > 0
    assert late[0] == 503 and json.loads(late[2]) == {"error": "server: shutting down"}
    assert ready[0] == 503
