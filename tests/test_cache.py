"""The response cache (service/cache.py) alone, and in a server: identical requests by seeds are answered from it
with the same bytes; anything that changes the answer (seeds, labels, ψ, format, the version) misses."""

from __future__ import annotations

import asyncio
import shutil

import aiohttp
import numpy as np

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.inference import grpc_predict_v2_pb2 as ipb
from service.api.inference import grpc_predict_v2_pb2_grpc as ipb_grpc
from service.cache import ResultCache, size
from service.dataplane import _cache_key
from service.domain import Format, Generate, Result, SeedRange
from service.registry import ModelVersion
from testkit.servefix import echo_model, running
from testkit.waiting import until


def result(nbytes: int, tag: int = 0) -> Result:
    return Result("m", 1, Format.UINT8, np.full(nbytes, tag, np.uint8))


def test_least_recently_used_leave_first_and_the_bound_is_bytes():
    seen: list[bool] = []
    held: list[int] = []
    cache = ResultCache(300, seen.append, held.append)
    for key in "abc":
        cache.put(key, result(100))
    assert cache.get("a") is not None  # a is now the most recent: b is the least
    cache.put("d", result(100))
    assert [cache.get(k) is not None for k in "abcd"] == [True, False, True, True]
    assert cache.bytes == 300 and held[-1] == 300 and seen.count(False) == 1
    # Looked up in the order a, c, d: a is now the least recent. 250 more bytes need all three entries' room.
    cache.put("e", result(250))
    assert [cache.get(k) is not None for k in "acde"] == [False, False, False, True] and cache.bytes == 250
    cache.put("huge", result(301))  # bigger than the whole cache: not kept, nothing dropped for it
    assert cache.get("huge") is None and cache.bytes == 250
    cache.put("e", result(50, tag=7))  # replaced, and counted once
    assert cache.bytes == 50 and cache.get("e").pixels[0] == 7
    assert size(Result("m", 1, Format.PNG, None, [b"12", b"345"], b"6789")) == 9


def test_a_server_answers_repeats_from_the_cache_with_the_same_bytes(tmp_path):
    echo_model(tmp_path / "echo" / "1" / "model.onnx")

    def request(seeds=(1, 2), label=0, psi=0.0, fmt=pb.PNG) -> pb.GenerateRequest:
        return pb.GenerateRequest(model="echo", seeds=pb.SeedList(seeds=seeds), labels=[pb.Label(index=label)],
                                  truncation=psi, output=pb.OutputOptions(format=fmt))  # fmt: skip

    def lookups(server, result: str) -> float:
        value = server.metrics.registry.get_sample_value("gan_response_cache_lookups_total", {"result": result})
        return value or 0.0

    async def go():
        async with running(tmp_path, response_cache_bytes=1 << 20, version_policy="latest:1") as (server, stub, _):
            first = await stub.Generate(request())
            again = await stub.Generate(request())
            hits = lookups(server, "hit")
            for changed in (request(seeds=(1, 3)), request(label=1), request(psi=0.5), request(fmt=pb.RAW_UINT8)):
                await stub.Generate(changed)
            misses = lookups(server, "miss")
            shutil.copytree(tmp_path / "echo" / "1", tmp_path / "echo" / "2")
            await server.reload()
            await until(lambda: server.registry.versions("echo") == [2])
            newer = await stub.Generate(request())
            return first, again, hits, misses, newer, lookups(server, "hit")

    first, again, hits, misses, newer, hits_after = asyncio.run(go())
    assert again.images == first.images and hits == 1
    assert misses == 1 + 4  # the first request, then every change
    assert newer.version == 2 and newer.images == first.images and hits_after == 1  # the same pixels, recomputed


def test_a_version_loaded_again_is_another_key():
    """Unloaded and loaded again, version 3 may be another file: its answers are not the old load's."""
    first, again = (ModelVersion("m", 3, session=None, spec=None, batcher=None) for _ in range(2))
    req = Generate("m", 3, SeedRange(0, 4))
    assert _cache_key(first, req) == _cache_key(first, req) != _cache_key(again, req)


def test_every_front_end_that_generates_by_seeds_uses_the_cache(tmp_path):
    """OIP over gRPC and REST and the PNG route: a repeat is a hit with the same bytes as the first answer."""
    echo_model(tmp_path / "echo" / "1" / "model.onnx")

    async def go():
        async with running(tmp_path, response_cache_bytes=1 << 20) as (server, _stub, channel):
            oip = ipb_grpc.GRPCInferenceServiceStub(channel)
            P = ipb.InferParameter
            infer = ipb.ModelInferRequest(model_name="echo", parameters={
                "seeds": P(string_param="1,2"), "labels": P(string_param="0"), "datatype": P(string_param="UINT8")})  # fmt: skip
            base = f"http://127.0.0.1:{server.http_port}"
            body = {"parameters": {"seeds": "3,4", "labels": "0", "datatype": "UINT8", "binary_data_output": True}}
            answers = {}
            async with aiohttp.ClientSession(base) as http:
                for _ in range(2):
                    reply = await oip.ModelInfer(infer)
                    answers.setdefault("oip grpc", []).append(reply.raw_output_contents[0])
                    async with http.post("/v2/models/echo/infer", json=body) as r:
                        answers.setdefault("oip rest", []).append(await r.read())
                    async with http.get("/v1/models/echo/images.png?seeds=5,6&label=0") as r:
                        answers.setdefault("png", []).append(await r.read())
            hits = server.metrics.registry.get_sample_value("gan_response_cache_lookups_total", {"result": "hit"})
            return answers, hits

    answers, hits = asyncio.run(go())
    assert all(first == again and first for first, again in answers.values()), answers.keys()
    assert hits == 3  # the second of each
