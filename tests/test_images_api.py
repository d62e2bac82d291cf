"""OpenAI's Images API (service/frontends/images.py), called by OpenAI's own Python client pointed at the server, on
the shipped conditional model and an unconditional one: the same images as ganserve.v1 for the same seeds, and a
clear 400 naming the field for every bad input."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil

import aiohttp
import numpy as np
import openai
import pytest
from PIL import Image

from service.api.ganserve.v1 import generator_pb2 as pb
from testkit.process import ROOT, shipped_version
from testkit.servefix import plain_model, running

MODEL = "mnist-cdcgan"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("images-api")
    version = str(shipped_version(MODEL))
    shutil.copytree(ROOT / "models" / MODEL / version, root / MODEL / version)
    plain_model(root / "plain" / "1" / "model.onnx")  # unconditional, 2x4 images
    return root


def client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)


def test_openais_client_gets_the_images_ganserve_draws_for_the_same_seeds(repo):
    async def go():
        async with running(repo) as (server, stub, _):
            images = await client(server).images.generate(
                model=MODEL, prompt="seven", n=3, size="28x28", response_format="b64_json", extra_body={"seed": 40}
            )
            by_index = await client(server).images.generate(model=MODEL, prompt="7", n=3, extra_body={"seed": 40})
            request = pb.GenerateRequest(model=MODEL, seeds=pb.SeedList(seeds=[40, 41, 42]), labels=[pb.Label(index=7)],
                                         output=pb.OutputOptions(format=pb.PNG))  # fmt: skip
            return images, by_index, await stub.Generate(request)

    images, by_index, answer = asyncio.run(go())
    pngs = [base64.b64decode(d.b64_json) for d in images.data]
    assert pngs == list(answer.images)  # byte for byte
    assert pngs == [base64.b64decode(d.b64_json) for d in by_index.data]  # "7" and "seven" are one class
    assert all(d.revised_prompt == "7" for d in images.data)
    assert images.model_extra["seed"] == 40 and images.model_extra["model_version"] == shipped_version(MODEL)
    assert {Image.open(io.BytesIO(p)).size for p in pngs} == {(28, 28)}


def test_without_a_seed_the_server_picks_one_and_returns_it(repo):
    async def go():
        async with running(repo) as (server, _stub, _):
            first = await client(server).images.generate(model=MODEL, prompt="Three", n=2)
            seed = first.model_extra["seed"]
            again = await client(server).images.generate(model=MODEL, prompt="3", n=2, extra_body={"seed": seed})
            return first, again

    first, again = asyncio.run(go())
    assert [d.b64_json for d in first.data] == [d.b64_json for d in again.data]


def test_an_unconditional_model_ignores_the_prompt_and_says_so(repo):
    async def go():
        async with running(repo) as (server, _stub, _):
            return await client(server).images.generate(model="plain", prompt="a cat", n=2, size="4x2")

    answer = asyncio.run(go())
    assert len(answer.data) == 2 and all(d.revised_prompt is None for d in answer.data)
    assert "unconditional" in answer.model_extra["prompt_ignored"]
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))).shape[:2] == (2, 4)


BAD = [
    (
        {"model": MODEL, "prompt": "a cat"},
        400,
        "prompt: 'a cat' names no class of model 'mnist-cdcgan' (accepted: 0, 1",
    ),
    ({"model": MODEL, "prompt": "   "}, 400, "prompt: required"),
    ({"model": MODEL}, 400, "prompt: required"),
    ({"model": MODEL, "prompt": "7" * 5000}, 400, "prompt: 5,000 characters"),
    ({"model": MODEL, "prompt": "7", "n": 0}, 400, "n: an integer from 1 to 10"),
    ({"model": MODEL, "prompt": "7", "n": 11}, 400, "n: an integer from 1 to 10"),
    ({"model": MODEL, "prompt": "7", "n": "2"}, 400, "n: an integer from 1 to 10"),
    ({"model": MODEL, "prompt": "7", "n": True}, 400, "n: an integer from 1 to 10"),
    ({"model": MODEL, "prompt": "7", "seed": -1}, 400, "seed: an integer from 0"),
    ({"model": MODEL, "prompt": "7", "seed": 2**64}, 400, "seed: an integer from 0"),
    ({"model": MODEL, "prompt": "7", "size": "1024x1024"}, 400, "size: this model draws 28x28 images"),
    ({"model": MODEL, "prompt": "7", "response_format": "url"}, 400, "response_format: only b64_json"),
    ({"model": MODEL, "prompt": "7", "quality": "hd"}, 400, "quality: 'hd' is not served"),
    ({"model": MODEL, "prompt": "7", "steps": 30}, 400, "'steps': unknown field"),
    ({"model": 7, "prompt": "7"}, 400, "model: a model name"),
    ({"prompt": "7"}, 400, "model: required when several are served (models: mnist-cdcgan, plain)"),
    ({"model": "nope", "prompt": "7"}, 404, "model: no model named 'nope'"),
    (["not", "an", "object"], 400, "request: expected a JSON object"),
    (b"{not json", 400, "request: the body is not JSON"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD)
def test_bad_input_gets_a_clear_error_naming_the_field(repo, body, status, message):
    async def go():
        async with running(repo) as (server, _stub, _), aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{server.http_port}/v1/images/generations"
            kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with http.post(url, **kwargs) as r:
                answer = r.status, await r.json()
            async with http.post(url, json={"model": MODEL, "prompt": "1"}) as r:  # and it goes on serving
                return answer, r.status

    (got, error), after = asyncio.run(go())
    assert (got, after) == (status, 200) and error["error"].startswith(message), error
    assert "Traceback" not in error["error"]
