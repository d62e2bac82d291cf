"""The one gate on every wire: deadlines and cancellation over HTTP as over gRPC, and hostile HTTP input refused
cheaply and quietly. Time is controlled by a gated model (testkit.gated), never by sleeps or slow models."""

from __future__ import annotations

import asyncio
import gzip
import logging
import time

import aiohttp
import grpc
import numpy as np
import pytest

import service.gate
from service import contract
from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.inference import grpc_predict_v2_pb2 as ipb
from service.api.inference import grpc_predict_v2_pb2_grpc as ipb_grpc
from service.runtime import Session
from testkit.gated import Gate as Hold
from testkit.gated import sessions
from testkit.servefix import echo_model, plain_model, running, server_config
from testkit.waiting import until

ONE_WORKER = {"batch_workers": 1}  # a held batch holds the only worker: what is queued behind it stays queued


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    echo_model(root / "echo" / "1" / "model.onnx")
    plain_model(root / "slow" / "1" / "model.onnx")
    return root


def cancelled(server, frontend: str, code: str) -> float:
    return (
        server.metrics.registry.get_sample_value("gan_cancelled_requests_total", {"frontend": frontend, "code": code})
        or 0
    )


async def hold(stub, gate: Hold) -> asyncio.Future:
    """A gRPC call whose batch is inside the model's run, held there: the one worker is busy until gate.open()."""
    call = asyncio.ensure_future(stub.Generate(pb.GenerateRequest(model="slow", seeds=pb.SeedList(seeds=[1]))))
    await gate.reached()
    return call


@pytest.mark.parametrize(
    ("how", "source"),
    [("parameter", "parameters.timeout (0.05 s)"), ("header", "X-Request-Timeout (0.05 s)"),
     ("default", "the server's default deadline (0.05 s)")],
)  # fmt: skip
def test_an_http_deadline_answers_504_naming_it_and_drops_the_queued_work(repo, how, source, monkeypatch):
    monkeypatch.setattr(service.gate, "SWEEP_S", 0.01)  # the default's sweep, every 10 ms rather than every second
    gate = Hold()
    body = {"parameters": {"seeds": "0-3"}} | (
        {"parameters": {"seeds": "0-3", "timeout": 50_000}} if how == "parameter" else {}
    )
    headers = {"X-Request-Timeout": "0.05"} if how == "header" else {}
    changes = ONE_WORKER | ({"http_deadline_s": 0.05} if how == "default" else {})

    async def go():
        async with (
            running(repo, session_factory=sessions(slow=gate.wait), **changes) as (server, stub, _),
            aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s,
        ):
            held = await hold(stub, gate)
            async with s.post("/v2/models/slow/infer", json=body, headers=headers) as r:
                answer = r.status, (await r.json())["error"]
            gate.open()
            await held
            return answer, gate.arrived, cancelled(server, "http", "DEADLINE_EXCEEDED")

    (status, message), runs, counted = asyncio.run(go())
    assert status == 504 and message == f"deadline: {source} passed before the call finished"
    assert runs == 1 and counted == 1  # the timed-out request's samples never reached the model


def test_an_oip_grpc_timeout_parameter_is_the_call_s_deadline(repo):
    gate = Hold()

    async def go():
        async with running(repo, session_factory=sessions(slow=gate.wait), **ONE_WORKER) as (_server, stub, channel):
            held = await hold(stub, gate)
            request = ipb.ModelInferRequest(model_name="slow", parameters={
                "seeds": ipb.InferParameter(string_param="0-3"), "timeout": ipb.InferParameter(int64_param=50_000)})  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ipb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
            gate.open()
            await held
            return err.value.code(), err.value.details(), gate.arrived

    code, details, runs = asyncio.run(go())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and details.startswith("deadline: parameters.timeout")
    assert runs == 1


def test_an_http_client_that_leaves_cancels_its_queued_work_and_is_counted(repo):
    gate = Hold()

    async def go():
        async with running(repo, session_factory=sessions(slow=gate.wait), **ONE_WORKER) as (server, stub, _):
            held = await hold(stub, gate)
            async with aiohttp.ClientSession() as s:
                request = asyncio.ensure_future(
                    s.get(f"http://127.0.0.1:{server.http_port}/v1/models/slow/images.png?seeds=0-63")
                )
                depth = {"model": "slow", "version": "1"}
                await until(lambda: server.metrics.registry.get_sample_value("gan_queue_depth", depth) > 0)
                request.cancel()  # the page aborts a superseded fetch: the connection closes
            await until(lambda: cancelled(server, "http", "CANCELLED") == 1)
            gate.open()
            await held
            return gate.arrived

    assert asyncio.run(go()) == 1  # the abandoned grid never ran


def test_an_oip_y_tensor_goes_to_the_model_as_given(repo):
    """y = [2, 0, 0] is not a distribution; OIP passes it on as ONNX Runtime would, not renormalised to [1, 0, 0]."""
    z = np.linspace(-0.5, 0.5, 5, dtype=np.float32)[None]
    y = np.array([[2.0, 0.0, 0.5]], np.float32)
    doc = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 5], "data": z.ravel().tolist()},
                      {"name": "y", "datatype": "FP32", "shape": [1, 3], "data": y.ravel().tolist()}]}  # fmt: skip

    async def go():
        async with (
            running(repo) as (server, _stub, _),
            aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s,
            s.post("/v2/models/echo/infer", json=doc) as r,
        ):
            return (await r.json())["outputs"][0]["data"]

    direct = Session(repo / "echo" / "1" / "model.onnx", server_config(repo).runtime)
    assert asyncio.run(go()) == direct.run({"z": z, "y": y}).ravel().tolist()


def test_hostile_http_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(repo, caplog):
    digits = "9" * 5000

    async def go():
        async with (
            running(repo, max_message_bytes=2 << 20, max_json_bytes=256 << 10) as (server, _stub, _),
            aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s,
        ):
            url = "/v2/models/echo/infer"
            cases = {
                "json_over_limit": ("POST", url, {"data": b"{" + b" " * (300 << 10) + b"}"}),
                "binary_over_limit": (
                    "POST",
                    url,
                    {"data": b"\0" * (3 << 20), "headers": {"Inference-Header-Content-Length": "2"}},
                ),
                "gzip_bomb": (
                    "POST",
                    url,
                    {
                        "data": gzip.compress(b" " * (8 << 20)),
                        "headers": {"Content-Encoding": "gzip", "Inference-Header-Content-Length": "2"},
                    },
                ),
                "bad_deflate": ("POST", url, {"data": b"xxxxxxxx", "headers": {"Content-Encoding": "deflate"}}),
                "huge_version": ("GET", f"/v2/models/echo/versions/{digits}", {}),
                "huge_header_length": (
                    "POST",
                    url,
                    {"data": b"{}", "headers": {"Inference-Header-Content-Length": digits}},
                ),
                "huge_seed": ("GET", f"/v1/models/echo/images.png?seeds={digits}&label=0", {}),
                "huge_label": ("GET", f"/v1/models/echo/images.png?seeds=1&label={digits}", {}),
                "huge_steps": ("GET", f"/v1/models/echo/interpolation.png?steps={digits}", {}),
                "seeds_text": (
                    "POST",
                    url,
                    {"json": {"parameters": {"seeds": ",".join(["1"] * 70000), "labels": "0"}}},
                ),
                "bad_timeout_header": (
                    "GET",
                    "/v1/models/echo/images.png?seeds=1&label=0",
                    {"headers": {"X-Request-Timeout": "soon"}},
                ),
            }
            cases |= {
                "no_timeout_header": ("GET", "/v1/models/echo/images.png?seeds=1&label=0", {"headers": {"X-Request-Timeout": "0"}}),
                "two_signs": ("GET", "/v1/models/echo/images.png?seeds=1&label=0&columns=-%2B5", {}),
                "huge_timeout": ("POST", url, {"json": {"parameters": {"seeds": "1", "labels": "0", "timeout": 10**400}}}),
                "huge_truncation": ("POST", url, {"json": {"parameters": {"seeds": "1", "labels": "0", "truncation": 10**400}}}),
                "huge_priority": ("POST", url, {"json": {"parameters": {"seeds": "1", "labels": "0", "priority": 10**400}}}),
                "huge_shape": ("POST", url, {"json": {"inputs": [{"name": "z", "datatype": "FP32", "shape": [10**3000, 10**3000], "data": []}]}}),
                "huge_value": ("POST", url, {"json": {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 5], "data": [10**400, 0, 0, 0, 0]}]}}),
            }  # fmt: skip
            answers = {}
            for name, (method, path, kwargs) in cases.items():
                async with s.request(method, path, **kwargs) as r:
                    answers[name] = r.status, (await r.json())["error"]
            async with s.get("/v1/models/echo/images.png?seeds=1&label=0") as r:
                return answers, r.status

    with caplog.at_level(logging.WARNING):
        answers, after = asyncio.run(go())
    expected = {
        "json_over_limit": (413, "request: the body is 307,202 bytes, over the 262,144-byte limit for JSON bodies"),
        "binary_over_limit": (413, "request: the body is 3,145,728 bytes, over the 2,097,152-byte limit"),
        "gzip_bomb": (413, "request: the body is over the 2,097,152-byte limit"),
        "bad_deflate": (400, "request: the body does not decode as Content-Encoding 'deflate'"),
        "huge_version": (400, "version: "),
        "huge_header_length": (400, "Inference-Header-Content-Length: "),
        "huge_seed": (400, "seeds: "),
        "huge_label": (400, "label: unknown class '99999"),
        "huge_steps": (400, "steps: an integer of at most 20 digits"),
        "seeds_text": (400, "parameters.seeds: 139,999 characters, more than 65,536"),
        "bad_timeout_header": (400, "X-Request-Timeout: a number"),
        "no_timeout_header": (400, "X-Request-Timeout: seconds, a number > 0"),
        "two_signs": (400, "columns: an integer"),
        "huge_timeout": (400, "parameters.timeout: microseconds"),
        "huge_truncation": (400, "parameters.truncation: a number"),
        "huge_priority": (400, "parameters.priority: 1 (high) or 2 (normal"),
        "huge_shape": (400, "inputs[0].shape: input 'z' is [n, width]"),
        "huge_value": (400, "inputs[0].data: must hold numbers only"),
    }
    for name, (status, start) in expected.items():
        assert answers[name][0] == status and answers[name][1].startswith(start), (name, answers[name])
    assert after == 200
    assert not [r for r in caplog.records if r.exc_info], "no traceback for any of it"


def test_protocol_garbage_is_one_counted_log_line_and_idle_connections_time_out(repo, caplog):
    async def go():
        async with running(repo, header_timeout_s=0.3) as (server, _stub, _):
            port = server.http_port
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v2 HTTP/9.9\r\n\r\n")
            status = await reader.readline()
            writer.close()
            # Slowloris: headers trickled a byte at a time never complete; the connection is closed.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            start = time.monotonic()
            closed_after = None
            for byte in b"GET /v2 HTTP/1.1\r\nHost: x\r\n":
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                        closed_after = time.monotonic() - start
                        break
                except asyncio.TimeoutError:
                    continue
                except ConnectionError:
                    closed_after = time.monotonic() - start
                    break
            writer.close()
            count = server.metrics.registry.get_sample_value("gan_http_protocol_errors_total")
            return status, closed_after, count

    with caplog.at_level(logging.DEBUG, logger="service.http.server"):
        status, closed_after, count = asyncio.run(go())
    assert status.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
    lines = [r for r in caplog.records if r.name == "service.http.server"]
    assert count == 1 and len(lines) == 1 and lines[0].exc_info is None and lines[0].levelno == logging.WARNING
    assert "BadHttpMessage" in lines[0].getMessage() or "BadStatusLine" in lines[0].getMessage()
    assert closed_after is not None and 0.2 < closed_after < 2.0


def test_the_drain_closes_a_half_sent_http_body_within_the_grace_period(repo):
    async def go():
        async with running(repo) as (server, _stub, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
            writer.write(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            await writer.drain()
            await until(lambda: server.gate.active == 1)  # the handler waits for the rest of the body
            start = time.monotonic()
            await server.stop(grace=0.5)
            took = time.monotonic() - start
            rest = await reader.read()
            writer.close()
            return took, rest

    took, rest = asyncio.run(go())
    assert took < 0.5 + 1.0 + 0.5  # the grace period, the HTTP shutdown's second, and slack; not aiohttp's 60 s
    assert rest == b"" or rest.startswith(b"HTTP/1.1 ")


def test_a_request_s_own_timeout_replaces_the_server_default_and_truncation_applies_to_tensors(repo, monkeypatch):
    """The README's order: OIP's `timeout`, else the header, else the default; a longer own timeout is honoured."""
    monkeypatch.setattr(service.gate, "SWEEP_S", 0.01)
    gate = Hold()
    z = [[0.9, -0.9, 0.5, 0.0, 0.2]]
    tensors = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 5], "data": z},
                          {"name": "y", "datatype": "FP32", "shape": [1, 3], "data": [[1, 0, 0]]}]}  # fmt: skip
    depth = {"model": "slow", "version": "1"}

    async def go():
        changes = ONE_WORKER | {"http_deadline_s": 0.05}
        async with (
            running(repo, session_factory=sessions(slow=gate.wait), **changes) as (server, stub, _),
            aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as s,
        ):
            held = await hold(stub, gate)
            body = {"parameters": {"seeds": "0-3", "timeout": 30_000_000}}
            answer = asyncio.ensure_future(s.post("/v2/models/slow/infer", json=body))
            await until(lambda: server.metrics.registry.get_sample_value("gan_queue_depth", depth) > 0)
            # The thing under test is a timer: held 4x past the default's 0.05 s, the call's own 30 s must count.
            await asyncio.sleep(0.2)
            gate.open()
            await held
            async with await answer as r:
                status = r.status
            outputs = {}
            for psi in (0, 0.5):
                doc = tensors | {"parameters": {"truncation": psi}}
                async with s.post("/v2/models/echo/infer", json=doc) as r:
                    outputs[psi] = (await r.json())["outputs"][0]["data"][:5]
            return status, outputs

    status, outputs = asyncio.run(go())
    assert status == 200
    assert outputs[0] == pytest.approx(z[0]) and outputs[0.5] == pytest.approx([v * 0.5 for v in z[0]])


def test_a_grpc_client_that_leaves_cancels_its_queued_work_and_is_counted(repo):
    """The same guarantee as over HTTP, on the other wire: queued chunks of a cancelled call never run."""
    gate = Hold()

    async def go():
        async with running(repo, session_factory=sessions(slow=gate.wait), **ONE_WORKER) as (server, stub, _):
            held = await hold(stub, gate)
            call = stub.Generate(pb.GenerateRequest(model="slow", seed_range=pb.SeedRange(start=0, count=64)))
            depth = {"model": "slow", "version": "1"}
            await until(lambda: (server.metrics.registry.get_sample_value("gan_queue_depth", depth) or 0) > 0)
            call.cancel()
            await until(lambda: cancelled(server, "grpc", "CANCELLED") == 1)
            gate.open()
            await held
            return gate.arrived

    assert asyncio.run(go()) == 1


def test_hostile_oip_grpc_parameters_get_invalid_argument_naming_the_field(repo):
    """What HTTP refuses, OIP over gRPC refuses too: the text and number rules are the same module's."""
    P = ipb.InferParameter

    async def go():
        async with running(repo) as (_server, _stub, channel):
            o = ipb_grpc.GRPCInferenceServiceStub(channel)
            cases = {
                "huge_version": ipb.ModelInferRequest(model_name="echo", model_version="9" * 5000),
                "bad_priority": ipb.ModelInferRequest(model_name="echo", parameters={
                    "seeds": P(string_param="1"), "labels": P(string_param="0"), "priority": P(string_param="1")}),
                "huge_timeout": ipb.ModelInferRequest(model_name="echo", parameters={
                    "seeds": P(string_param="1"), "labels": P(string_param="0"), "timeout": P(uint64_param=2**64 - 1)}),
                "seeds_text": ipb.ModelInferRequest(model_name="echo", parameters={
                    "seeds": P(string_param=",".join(["1"] * 70000)), "labels": P(string_param="0")}),
                "huge_label": ipb.ModelInferRequest(model_name="echo", parameters={
                    "seeds": P(string_param="1"), "labels": P(string_param="9" * 5000)}),
            }  # fmt: skip
            answers = {}
            for name, request in cases.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await o.ModelInfer(request)
                answers[name] = err.value.code(), err.value.details()
            ok = await o.ModelInfer(ipb.ModelInferRequest(model_name="echo", parameters={
                "seeds": P(string_param="1"), "labels": P(string_param="0")}))  # fmt: skip
            return answers, ok.model_name

    answers, served = asyncio.run(go())
    expected = {
        "huge_version": "model_version: ",
        "huge_timeout": "parameters.timeout: microseconds",
        "bad_priority": "parameters.priority: 1 (high) or 2 (normal",
        "seeds_text": "parameters.seeds: 139,999 characters",
        "huge_label": "parameters.labels: unknown class '99999",
    }
    for name, start in expected.items():
        code, details = answers[name]
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(start), (name, details)
    assert served == "echo"


def test_oip_priority_one_goes_first_on_both_wires(tmp_path):
    """Behind a held batch: normal requests queued first, then priority-1 ones over gRPC and REST; the model runs
    the urgent ones first, in arrival order, then the normal ones."""
    plain_model(tmp_path / "m" / "1" / "model.onnx")
    hold = Hold()
    ran: list[float] = []  # z[0, 0] of each batch, in the order the model ran them

    def model_runs(feeds) -> None:
        ran.append(float(feeds["z"][0, 0]))
        hold.wait()

    P = ipb.InferParameter
    cases = [("normal rest", 2), ("normal grpc", 0), ("urgent grpc", 1), ("urgent rest", 1)]

    async def go():
        async with running(tmp_path, session_factory=sessions(m=model_runs), max_batch_size=1, **ONE_WORKER) as (
            server, _stub, channel,
        ):  # fmt: skip
            oip = ipb_grpc.GRPCInferenceServiceStub(channel)
            url = f"http://127.0.0.1:{server.http_port}/v2/models/m/infer"
            async with aiohttp.ClientSession() as http:

                async def call(seed: int, wire: str, priority: int) -> None:
                    if wire == "rest":
                        body = {"parameters": {"seeds": str(seed), "priority": priority}}
                        async with http.post(url, json=body) as r:
                            assert r.status == 200, await r.text()
                    else:
                        await oip.ModelInfer(ipb.ModelInferRequest(model_name="m", parameters={
                            "seeds": P(string_param=str(seed)), "priority": P(int64_param=priority)}))  # fmt: skip

                batcher = server.registry.models["m"][1].batcher
                calls = [asyncio.ensure_future(call(100, "rest", 0))]
                await until(lambda: hold.waiting == 1)
                for seed, (tag, priority) in enumerate(cases):
                    calls.append(asyncio.ensure_future(call(seed, tag.split()[1], priority)))
                    await until(lambda seed=seed: batcher.queue_depth == seed + 1)
                hold.open()
                await asyncio.gather(*calls)
                spec = server.registry.models["m"][1].spec
        tag_of = {float(contract.seed_latent(seed, spec.latent_dim, spec.prior)[0]): tag
                  for seed, (tag, _) in enumerate(cases)}  # fmt: skip
        return [tag_of[z] for z in ran[1:]]  # after the held one

    assert asyncio.run(go()) == ["urgent grpc", "urgent rest", "normal rest", "normal grpc"]
