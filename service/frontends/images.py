"""OpenAI's Images API, `POST /v1/images/generations`: the shape that image UIs and OpenAI's own clients already call
(README, "Images API"). It translates one request into a domain Generate and nothing more.

The prompt names a class: its index ("7"), its name as the model declares it, or, where the classes are the digits,
the number's English word ("seven"), in any case. Anything else is refused with the list of what is accepted; an
unconditional model ignores the prompt and says so in the answer. `seed` (an extension) fixes the images: seeds
seed … seed+n-1, under the seed contract, so the same request always draws the same pixels; without it the server
picks one and returns it. Images come back as PNG, base64 (`b64_json`): this server keeps no files to link to.
"""

from __future__ import annotations

import base64
import json
import secrets
import time

from aiohttp import web

from service import domain as dm
from service import gate
from service.contract import MAX_SEED
from service.dataplane import DataPlane
from service.errors import InvalidArgument, short
from service.http import Route, read_body

SERVICE = "ganserve.v1.Generator"  # the role its route needs: generating, as over gRPC
MAX_N = 10  # images per request, as OpenAI's API allows
MAX_PROMPT = 4000
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Accepted and ignored, as OpenAI's defaults: fields its clients send that change nothing here.
IGNORED = {"user": None, "quality": ("auto", "standard"), "style": None, "output_format": ("png",)}
FIELDS = ("model", "prompt", "n", "size", "response_format", "seed", *IGNORED)
NAMES = dm.Names({"model": "model", "version": "model", "seed_range": "seed", "labels": "prompt"})


class ImagesApi:
    def __init__(self, plane: DataPlane, max_json_bytes: int):
        self.plane, self.max_json_bytes = plane, max_json_bytes

    def routes(self) -> list[Route]:
        return [Route("images_generations", "POST", "/v1/images/generations", self.generate, SERVICE,
                      method="ImagesGenerations")]  # fmt: skip

    async def generate(self, request: web.Request) -> web.Response:
        doc = _document(await read_body(request, self.max_json_bytes, " for JSON bodies"))
        info = self.plane.get_model(_model(doc, self.plane), 0, NAMES)
        n = _integer(doc, "n", 1, 1, MAX_N)
        seed = _integer(doc, "seed", None, 0, MAX_SEED - n + 1)
        seed = secrets.randbelow(2**31) if seed is None else seed
        _size(doc.get("size"), info.spec.output_shape)
        if doc.get("response_format") not in (None, "b64_json"):
            raise InvalidArgument("response_format: only b64_json: this server keeps no images to link to")
        for name, allowed in IGNORED.items():
            if allowed is not None and doc.get(name) not in (None, *allowed):
                raise InvalidArgument(
                    f"{name}: {short(str(doc[name]), 32)} is not served (accepted: {', '.join(allowed)})"
                )
        prompt = doc.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidArgument("prompt: required: the class to draw, such as '7' or 'seven'")
        if len(prompt) > MAX_PROMPT:
            raise InvalidArgument(f"prompt: {len(prompt):,} characters, more than {MAX_PROMPT:,}")
        classes = info.spec.class_names
        index = _class(prompt, classes, info.name) if classes else None
        labels = [dm.Label(index=index)] if index is not None else []
        req = dm.Generate(info.name, info.version, dm.SeedRange(seed, n), labels, 0.0, dm.Output(dm.Format.PNG), NAMES)
        result = await self.plane.generate(req, gate.deadline())
        drawn = classes[index] if index is not None else None
        answer = {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": drawn} for png in result.pngs],
            "model": result.model, "model_version": result.version, "seed": seed,
        }  # fmt: skip
        if index is None:
            answer["prompt_ignored"] = f"model {info.name!r} is unconditional: the prompt does not choose what it draws"
        return web.json_response(answer, headers={"X-Model": result.model, "X-Model-Version": str(result.version)})


def _document(body: bytes | bytearray) -> dict:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidArgument("request: the body is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("request: expected a JSON object")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise InvalidArgument(f"{short(unknown[0], 32)}: unknown field (fields: {', '.join(FIELDS)})")
    return doc


def _model(doc: dict, plane: DataPlane) -> str:
    """The model asked for; the only one loaded when none is named."""
    name = doc.get("model")
    if name is None:
        served = [info.name for info in plane.list_models()]
        if len(served) == 1:
            return served[0]
        raise InvalidArgument(f"model: required when several are served (models: {', '.join(served) or 'none'})")
    if not isinstance(name, str):
        raise InvalidArgument("model: a model name, as a string")
    return name


def _integer(doc: dict, field: str, default: int | None, low: int, high: int) -> int | None:
    value = doc.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"{field}: an integer from {low} to {high} (got {short(str(value), 32)})")
    return value


def _size(size: object, shape: tuple[int, ...]) -> None:
    """`size` must be the model's own (WIDTHxHEIGHT) or auto: a generator draws at one size."""
    height, width = shape[-2:]  # the contract's [C, H, W]
    own = f"{width}x{height}"
    if size not in (None, "auto", own):
        raise InvalidArgument(f"size: this model draws {own} images (sizes: {own}, auto; got {short(str(size), 32)})")


def _class(prompt: str, classes: tuple[str, ...], model: str) -> int:
    """The class a prompt names: its index, its name, or the English word of a digit class, in any case."""
    wanted = prompt.strip().lower()
    for i, name in enumerate(classes):
        word = WORDS[int(name)] if name.isascii() and name.isdigit() and int(name) < len(WORDS) else None
        if wanted in (str(i), name.lower(), word):
            return i
    words = [WORDS[int(c)] for c in classes if c.isascii() and c.isdigit() and int(c) < len(WORDS)]
    accepted = ", ".join([*classes, *words][:40])
    raise InvalidArgument(f"prompt: {short(prompt, 48)} names no class of model {model!r} (accepted: {accepted})")
