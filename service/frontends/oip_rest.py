"""The Open Inference Protocol over REST (KServe v2): JSON, or JSON and raw tensor bytes (the binary extension)
→ service/frontends/oip.py's meaning → the data plane → JSON or binary.

A body is bounded before it is read: JSON by its own limit (`--max-json-bytes`, well below the binary one, for
numbers as text cost ~20x their binary size to parse), a body with binary tensors by the message limit. A body
past a few kilobytes is parsed and turned into arrays off the event loop, and so is a big JSON answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from concurrent.futures import Executor

import numpy as np
from aiohttp import web

from service.dataplane import DataPlane
from service.errors import InvalidArgument, short
from service.frontends import oip, text
from service.http import Route, read_body

JSON_HEADER = "Inference-Header-Content-Length"  # the binary tensor extension's split between JSON and bytes
SERVICE = "inference.GRPCInferenceService"  # the role its routes need: the same as OIP over gRPC
ON_LOOP = 16 << 10  # body or answer bytes handled on the event loop; more go to the executor
DATATYPES = {"FP32": "<f4", "UINT8": "u1"}
REST_FIELDS = ("model", "version")


class OipRest:
    """The routes of the Open Inference Protocol's REST binding."""

    def __init__(
        self, plane: DataPlane, max_body_bytes: int, max_json_bytes: int, executor: Executor | None,
        draining: Callable[[], bool],
    ):  # fmt: skip
        self.plane, self.max_body_bytes, self.max_json_bytes = plane, max_body_bytes, max_json_bytes
        self.executor, self.draining = executor, draining

    def routes(self) -> list[Route]:
        m, v = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
        return [
            Route("live", "GET", "/v2/health/live", self.live, None, "live"),
            Route("ready", "GET", "/v2/health/ready", self.ready, None, "ready"),
            Route("server_metadata", "GET", "/v2", self.server_metadata, SERVICE),
            Route("model_metadata", "GET", m, self.model_metadata, SERVICE),
            Route("model_metadata_version", "GET", v, self.model_metadata, SERVICE, "model_metadata"),
            Route("model_ready", "GET", f"{m}/ready", self.model_ready, SERVICE),
            Route("model_ready_version", "GET", f"{v}/ready", self.model_ready, SERVICE, "model_ready"),
            Route("infer", "POST", f"{m}/infer", self.infer, SERVICE),
            Route("infer_version", "POST", f"{v}/infer", self.infer, SERVICE, "infer"),
        ]

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.plane.registry.ready and not self.draining()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        meta = {"name": oip.SERVER_NAME, "version": oip.server_version(), "extensions": oip.EXTENSIONS}
        return web.json_response(meta)

    async def model_metadata(self, request: web.Request) -> web.Response:
        version = text.version(request.match_info.get("version", ""), "version")
        return web.json_response(oip.model_metadata(self.plane.get_model(request.match_info["model"], version)))

    async def model_ready(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        ready = self.plane.is_ready(model, text.version(request.match_info.get("version", ""), "version"))
        return web.json_response({"name": model, "ready": ready}, status=200 if ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        header = request.headers.get(JSON_HEADER)
        if header is None:
            body = await read_body(request, self.max_json_bytes, " for JSON bodies (send tensors as binary data)")
        else:
            body = await read_body(request, self.max_body_bytes)
        if len(body) <= ON_LOOP:
            doc, inputs, parameters, outputs, binary = parse(body, header, self.max_json_bytes)
        else:
            loop = asyncio.get_running_loop()
            doc, inputs, parameters, outputs, binary = await loop.run_in_executor(
                self.executor, parse, body, header, self.max_json_bytes
            )  # fmt: skip
        model, version = request.match_info["model"], request.match_info.get("version", "")
        req = oip.request(model, version, parameters, inputs, outputs, REST_FIELDS)
        answer = await oip.answer(self.plane, req)
        tensors = [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in answer.outputs]
        reply = {"model_name": answer.model, "model_version": str(answer.version), "outputs": tensors}
        if isinstance(doc.get("id"), str):
            reply["id"] = doc["id"]
        if answer.parameters:
            reply["parameters"] = answer.parameters
        # Each output travels as JSON numbers or as bytes after the JSON (binary), as the client asked for it.
        binaries = [binary(t.name) for t in answer.outputs]
        for tensor, t, in_binary in zip(tensors, answer.outputs, binaries, strict=True):
            if in_binary:
                tensor["parameters"] = {"binary_data_size": t.values.nbytes}
        numbers = [None if in_binary else t.values for t, in_binary in zip(answer.outputs, binaries, strict=True)]
        # Numbers as JSON text cost ~0.1 µs each: a big answer is written off the event loop, a small one here.
        if sum(values.nbytes for values in numbers if values is not None) <= ON_LOOP:
            json_text = _json_answer(reply, numbers)
        else:
            json_text = await asyncio.get_running_loop().run_in_executor(self.executor, _json_answer, reply, numbers)
        if not any(binaries):
            return web.Response(text=json_text, content_type="application/json")
        head = json_text.encode()
        # The answer's one copy of each binary tensor: its bytes, in the order of the outputs.
        blobs = [memoryview(np.ascontiguousarray(t.values)).cast("B") for t, in_binary
                 in zip(answer.outputs, binaries, strict=True) if in_binary]  # fmt: skip
        body = b"".join([head, *blobs])
        return web.Response(body=body, content_type="application/octet-stream", headers={JSON_HEADER: str(len(head))})


def parse(
    body: bytes | bytearray, header: str | None, max_json_bytes: int
) -> tuple[dict, list[oip.Tensor], Mapping[str, oip.Parameter], list[oip.Requested], Callable[[str], bool]]:
    """A REST infer body → its JSON document, input tensors, parameters, outputs, and which outputs to answer in
    binary (by name). Pure: it runs off the event loop for big bodies."""
    head, rest = _split(body, header)
    if len(head) > max_json_bytes:
        raise InvalidArgument(f"{JSON_HEADER}: the JSON part is over the {max_json_bytes:,}-byte limit")
    doc = _json_object(head)
    inputs = _json_inputs(doc.get("inputs", []), rest)
    parameters = _parameters(doc.get("parameters", {}), "parameters")
    outputs, binary = _json_outputs(doc.get("outputs", []), parameters.get("binary_data_output") is True)
    return doc, inputs, parameters, outputs, binary


def _json_answer(answer: dict, values: list[np.ndarray | None]) -> str:
    """The answer's JSON, each output given values with them as its `data` (the others are binary)."""
    for tensor, data in zip(answer["outputs"], values, strict=True):
        if data is not None:
            tensor["data"] = data.ravel().tolist()
    return json.dumps(answer)


def _split(body: bytes | bytearray, header: str | None) -> tuple[bytes | bytearray, memoryview]:
    """The binary tensor extension: the first `header` bytes are JSON, the rest tensor bytes (a view, not a copy)."""
    if header is None:
        return body, memoryview(b"")
    if not header.isascii() or not header.isdigit() or len(header) > 20 or int(header) > len(body):
        raise InvalidArgument(f"{JSON_HEADER}: {short(header)} is not a length within the {len(body)}-byte body")
    return body[: int(header)], memoryview(body)[int(header) :]


def _json_object(data: bytes | bytearray) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"request: the body is not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("request: the body must be a JSON object")
    return doc


def _json_inputs(items: object, rest: memoryview) -> list[oip.Tensor]:
    if not isinstance(items, list):
        raise InvalidArgument("inputs: must be a list of tensors")
    tensors, offset = [], 0
    for i, item in enumerate(items):
        field = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f"{field}: must be an object with name, datatype, shape and data")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidArgument(f"{field}: name and datatype must be strings")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument(f"{field}.shape: must be a list of integers")
        parameters = _parameters(item.get("parameters", {}), f"{field}.parameters")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(rest) - offset:
                raise InvalidArgument(f"{field}.parameters.binary_data_size: past the end of the body's tensor bytes")
            if name == "images" and datatype == "UINT8":  # an inversion's pixels; any other input is FP32
                data = np.frombuffer(rest, np.uint8, size, offset)
            elif size % 4:
                raise InvalidArgument(f"{field}.parameters.binary_data_size: {size} bytes is not whole FP32 values")
            else:
                data = np.frombuffer(rest, "<f4", size // 4, offset)
            offset += size
        else:
            data = _json_values(item.get("data"), name, datatype, f"{field}.data")
        tensors.append(oip.Tensor(name, datatype, tuple(shape), data, field))
    if offset != len(rest):
        raise InvalidArgument(f"{JSON_HEADER}: {len(rest) - offset} bytes after the JSON belong to no input")
    return tensors


def _json_values(data: object, name: str, datatype: str, field: str) -> np.ndarray | None:
    if datatype == "UINT8" and name == "images":  # an inversion's pixels
        return _json_uint8(data, field)
    if datatype != "FP32":
        return None  # refused by name in oip, before the values matter
    if not isinstance(data, list):
        raise InvalidArgument(f"{field}: must be a list of numbers (flat or nested, row-major)")
    try:
        values = np.asarray(data, dtype=np.float32).ravel()
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument(f"{field}: must hold numbers only, in lists of equal length") from None
    if not np.all(np.isfinite(values)):
        raise InvalidArgument(f"{field}: values must be finite")
    return values


def _json_uint8(data: object, field: str) -> np.ndarray:
    """UINT8 values as JSON numbers: integers from 0 to 255, flat or nested."""
    if not isinstance(data, list):
        raise InvalidArgument(f"{field}: must be a list of integers from 0 to 255 (flat or nested, row-major)")
    try:
        values = np.asarray(data).ravel()
    except (ValueError, TypeError, OverflowError):
        values = np.asarray([None])
    if values.size and (values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255):
        raise InvalidArgument(f"{field}: must hold integers from 0 to 255 only, in lists of equal length")
    return values.astype(np.uint8)


def _json_outputs(items: object, binary_default: bool) -> tuple[list[oip.Requested], Callable[[str], bool]]:
    """The outputs asked for, and which to answer in binary (Triton's extension) rather than JSON: an output listed
    by its own `binary_data`, any other by the request's `binary_data_output`."""
    if not isinstance(items, list):
        raise InvalidArgument("outputs: must be a list")
    outputs, binary = [], {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidArgument(f"outputs[{i}]: must be an object with a name")
        parameters = _parameters(item.get("parameters", {}), f"outputs[{i}].parameters")
        binary[item["name"]] = parameters.get("binary_data", binary_default) is True
        datatype = parameters.get("datatype")
        outputs.append(oip.Requested(item["name"], None if datatype is None else str(datatype)))
    return outputs, lambda name: binary.get(name, binary_default)


def _parameters(value: object, field: str) -> Mapping[str, oip.Parameter]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: must be an object")
    for key, v in value.items():
        if not isinstance(v, (bool, int, float, str)):
            raise InvalidArgument(f"{field}: parameter {short(key, 32)} is not a boolean, number or string")
    return value
