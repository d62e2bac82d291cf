"""HTTP on one port: Open Inference Protocol REST, PNG endpoints for people and `<img>` tags, the playground, and
/metrics. It runs in the gRPC server's process and event loop, over the same data plane: no second copy of a model.

aiohttp serves it: its AppRunner and TCPSite start inside an event loop that is already running, take no signal
handlers of their own and shut down gracefully, which is what sharing one loop with grpc.aio needs.

Every route translates its wire format into a domain request and nothing more. One middleware owns what every
route shares, as the interceptor does for gRPC: tokens, the drain, errors → status codes and `{"error": ...}`
bodies, request metrics (method label `http.<route>`) and a Server-Timing header with the server's own time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources

import grpc
import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import domain as dm
from service import oip
from service.dataplane import DataPlane
from service.errors import InvalidArgument, ServiceError, renamed, short
from service.interceptor import Interceptor, status_of
from service.metrics import UNKNOWN_MODEL
from service.security import Authorizer, Refusal

log = logging.getLogger(__name__)

C = grpc.StatusCode
HTTP_STATUS = {
    C.OK: 200, C.INVALID_ARGUMENT: 400, C.FAILED_PRECONDITION: 400, C.NOT_FOUND: 404, C.RESOURCE_EXHAUSTED: 429,
    C.UNAVAILABLE: 503, C.DEADLINE_EXCEEDED: 504, C.UNAUTHENTICATED: 401, C.PERMISSION_DENIED: 403,
    C.UNIMPLEMENTED: 501, C.INTERNAL: 500,
}  # fmt: skip
JSON_HEADER = "Inference-Header-Content-Length"  # the binary tensor extension's split between JSON and bytes
OIP_SERVICE = "inference.GRPCInferenceService"
GENERATOR_SERVICE = "ganserve.v1.Generator"
PLAYGROUND = {"/": ("index.html", "text/html"), "/playground.js": ("playground.js", "text/javascript"),
              "/playground.css": ("playground.css", "text/css")}  # fmt: skip
# The page loads its own script and style only, and images from this origin or blobs it made from them.
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'"
IMAGE_QUERY = ("seeds", "label", "soft", "psi", "columns", "version")
STRIP_QUERY = ("from", "to", "steps", "from_label", "to_label", "from_soft", "to_soft", "psi", "method", "version")
DATATYPES = {"FP32": "<f4", "UINT8": "u1"}
JSON_ON_LOOP = 16 << 10  # output bytes written as JSON on the event loop; more go to the encoder threads
# The data plane's fields → the query parameters that carried them, so that errors name what the caller wrote.
IMAGE_NAMES = {"seeds.seeds": "seeds", "seed_range": "seeds", "truncation": "psi", "output.grid_columns": "columns"}
STRIP_NAMES = {"keyframes[0]": "from", "keyframes[1]": "to", "keyframes": "from", "truncation": "psi"}


class Front:
    """The HTTP front end: routes over the data plane, one middleware around them."""

    def __init__(
        self, plane: DataPlane, interceptor: Interceptor, authorizer: Authorizer | None, max_body_bytes: int,
    ):  # fmt: skip
        self.plane, self.interceptor, self.authorizer = plane, interceptor, authorizer
        self.metrics = interceptor.metrics
        self.app = web.Application(middlewares=[self.middleware], client_max_size=max_body_bytes)
        # name: (path, handler, the service whose role it needs with tokens on, or None for open routes)
        routes: dict[str, tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]], str | None]] = {
            "live": ("/v2/health/live", self.live, None),
            "ready": ("/v2/health/ready", self.ready, None),
            "server_metadata": ("/v2", self.server_metadata, OIP_SERVICE),
            "model_metadata": ("/v2/models/{model}", self.model_metadata, OIP_SERVICE),
            "model_metadata_version": ("/v2/models/{model}/versions/{version}", self.model_metadata, OIP_SERVICE),
            "model_ready": ("/v2/models/{model}/ready", self.model_ready, OIP_SERVICE),
            "model_ready_version": ("/v2/models/{model}/versions/{version}/ready", self.model_ready, OIP_SERVICE),
            "infer": ("/v2/models/{model}/infer", self.infer, OIP_SERVICE),
            "infer_version": ("/v2/models/{model}/versions/{version}/infer", self.infer, OIP_SERVICE),
            "models": ("/v1/models", self.models, GENERATOR_SERVICE),
            "images": ("/v1/models/{model}/images.png", self.images, GENERATOR_SERVICE),
            "interpolation": ("/v1/models/{model}/interpolation.png", self.interpolation, GENERATOR_SERVICE),
            "metrics": ("/metrics", self.prometheus, GENERATOR_SERVICE),
        }
        self.roles = {name: service for name, (_, _, service) in routes.items()}
        for name, (path, handler, _) in routes.items():
            method = "POST" if name.startswith("infer") else "GET"
            self.app.router.add_route(method, path, handler, name=name)
        self.files = {path: _asset(*asset) for path, asset in PLAYGROUND.items()}
        for path, (name, _) in PLAYGROUND.items():
            self.app.router.add_get(path, self.playground, name=f"page:{name}")

    # ---- the middleware ---------------------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        start = time.perf_counter()
        route = request.match_info.route.name
        if route is None or route.startswith("page:"):  # unknown paths (aiohttp's 404/405) and the page's files
            try:
                return await handler(request)
            except web.HTTPException as e:
                return _error(e.status, e.reason)
        method = f"http.{route.removesuffix('_version')}"
        name = request.match_info.get("model", "")
        model = name if name and self.plane.is_ready(name) else UNKNOWN_MODEL
        counted = route not in ("live", "ready")
        if counted and self.interceptor.draining:
            self.interceptor.record(method, model, C.UNAVAILABLE, start)
            return _error(503, "server: shutting down")
        refusal = self._authorize(request, route)
        if refusal is not None:
            self.interceptor.record(method, model, refusal.code, start)
            response = _error(HTTP_STATUS[refusal.code], refusal.message)
            if refusal.code is C.UNAUTHENTICATED:
                response.headers["WWW-Authenticate"] = "Bearer"
            return response
        code = C.UNKNOWN
        try:
            with self.interceptor.call() if counted else contextlib.nullcontext():
                response = await handler(request)
            code = C.OK
        except ServiceError as e:
            code, message = status_of(e)
            response = _error(HTTP_STATUS[code], message)
        except web.HTTPRequestEntityTooLarge as e:
            code = C.RESOURCE_EXHAUSTED
            response = _error(413, f"request: the body is over the {e.max_size:,}-byte limit")
        except web.HTTPException as e:
            code = C.INVALID_ARGUMENT if e.status < 500 else C.INTERNAL
            response = _error(e.status, e.reason)
        except Exception:
            code = C.INTERNAL
            log.exception("%s %s failed", request.method, request.path)
            response = _error(500, "internal error")
        finally:
            self.interceptor.record(method, model, code, start)
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - start) * 1e3:.2f}"
        return response

    def _authorize(self, request: web.Request, route: str) -> Refusal | None:
        service = self.roles.get(route)
        if self.authorizer is None or service is None:
            return None
        headers = [("authorization", v) for v in request.headers.getall("Authorization", [])]
        refusal = self.authorizer.check(f"/{service}/{route}", headers)
        if refusal is not None:
            self.metrics.auth_failures.labels(refusal.reason).inc()
            log.warning(
                "refused HTTP %s %s from %s: %s (token %s)", request.method, request.path, request.remote,
                refusal.reason, refusal.token or "-",
            )  # fmt: skip  # the audit line: never the token itself
        return refusal

    # ---- Open Inference Protocol --------------------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.plane.registry.ready and not self.interceptor.draining
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        meta = {"name": oip.SERVER_NAME, "version": oip.server_version(), "extensions": oip.EXTENSIONS}
        return web.json_response(meta)

    async def model_metadata(self, request: web.Request) -> web.Response:
        model, version = _model_of(request)
        return web.json_response(oip.model_metadata(self.plane.get_model(model, version, "model")))

    async def model_ready(self, request: web.Request) -> web.Response:
        model, version = _model_of(request)
        ready = self.plane.is_ready(model, version)
        return web.json_response({"name": model, "ready": ready}, status=200 if ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        body = await request.read()
        head, rest = _split(body, request.headers.get(JSON_HEADER))
        doc = _json_object(head)
        inputs = _json_inputs(doc.get("inputs", []), rest)
        parameters = _parameters(doc.get("parameters", {}), "parameters")
        outputs, binary = _json_outputs(doc.get("outputs", []), parameters.get("binary_data_output") is True)
        model, version = request.match_info["model"], request.match_info.get("version", "")
        out = await oip.infer(self.plane, model, version, parameters, inputs, outputs, fields=("model", "version"))
        tensor = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        answer = {"model_name": out.model, "model_version": str(out.version), "outputs": [tensor]}
        if isinstance(doc.get("id"), str):
            answer["id"] = doc["id"]
        if not binary:
            # Numbers as JSON text cost ~0.1 µs each: a big answer is written off the event loop, a small one here.
            if len(out.blob) <= JSON_ON_LOOP:
                text = _json_answer(answer, out)
            else:
                text = await asyncio.get_running_loop().run_in_executor(self.plane.encoder, _json_answer, answer, out)
            return web.Response(text=text, content_type="application/json")
        tensor["parameters"] = {"binary_data_size": len(out.blob)}
        head = json.dumps(answer).encode()
        return web.Response(
            body=head + out.blob, content_type="application/octet-stream", headers={JSON_HEADER: str(len(head))}
        )

    # ---- for people and <img> tags --------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        """Every model as ganserve.v1's ListModels describes it, for the playground's pickers."""
        return web.json_response({"models": [_model_json(info) for info in self.plane.list_models()]})

    async def images(self, request: web.Request) -> web.Response:
        """A PNG grid: ?seeds=0-15&label=7&psi=0.7&columns=4 (or soft=w0,w1,... for blended classes)."""
        q = _query(request, IMAGE_QUERY)
        seeds = oip.seed_text(q.get("seeds", "0"), "seeds")
        label = _label(q.get("label"), q.get("soft"), "label")
        columns = _int(q.get("columns", "0"), "columns")
        model, version = _model_of(request, q)
        output = dm.Output("png", grid=True, grid_columns=columns, grid_only=True)
        generate = dm.Generate(
            model, version, seeds, [label] if label else [], _float(q.get("psi", "0"), "psi"), output
        )  # fmt: skip
        names = IMAGE_NAMES | {"labels": "soft" if "soft" in q else "label"}
        return _png(await _renamed(self.plane.generate(generate), names))

    async def interpolation(self, request: web.Request) -> web.Response:
        """A PNG strip of frames from seed to seed: ?from=0&to=1&steps=8&from_label=3&to_label=5&psi=0.7."""
        q = _query(request, STRIP_QUERY)
        keys = [
            dm.Keyframe(seed=_int(q.get(end, first), end), label=_label(q.get(f"{end}_label"), q.get(f"{end}_soft"),
                                                                         f"{end}_label"))
            for end, first in (("from", "0"), ("to", "1"))
        ]  # fmt: skip
        model, version = _model_of(request, q)
        steps, psi = _int(q.get("steps", "8"), "steps"), _float(q.get("psi", "0"), "psi")
        interpolate = dm.Interpolate(
            model, version, keys, steps, q.get("method", "slerp"), psi, dm.Output("png", grid=True, grid_only=True)
        )  # fmt: skip
        given = {end: f"{end}_soft" if f"{end}_soft" in q else f"{end}_label" for end in ("from", "to")}
        # A label at one end only: the message names the end that lacks one.
        lacking = given["to"] if given["from"] in q else given["from"]
        names = STRIP_NAMES | {"keyframes.label[0]": given["from"], "keyframes.label[1]": given["to"],
                               "keyframes.label": lacking}  # fmt: skip
        return _png(await _renamed(self.plane.interpolate(interpolate), names))

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def playground(self, request: web.Request) -> web.Response:
        body, content_type = self.files[request.path]
        return web.Response(
            body=body, content_type=content_type, charset="utf-8",
            headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
        )  # fmt: skip


async def _renamed(call: Awaitable[dm.Result], names: dict[str, str]) -> dm.Result:
    try:
        return await call
    except ServiceError as e:
        raise renamed(e, names) from None


def _asset(name: str, content_type: str) -> tuple[bytes, str]:
    return resources.files("service").joinpath("playground", name).read_bytes(), content_type


def _json_answer(answer: dict, out: oip.Outcome) -> str:
    answer["outputs"][0]["data"] = np.frombuffer(out.blob, DATATYPES[out.datatype]).tolist()
    return json.dumps(answer)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _png(result: dm.Result) -> web.Response:
    return web.Response(
        body=result.grid_png, content_type="image/png",
        headers={"X-Model": result.model, "X-Model-Version": str(result.version)},
    )  # fmt: skip


def _model_of(request: web.Request, query: Mapping[str, str] | None = None) -> tuple[str, int]:
    """The model and version a route names: in its path (OIP), or in its query (the PNG endpoints); "": latest."""
    version = request.match_info.get("version", "") if query is None else query.get("version", "")
    return request.match_info["model"], oip.parse_version(version, "version")


def _model_json(info: dm.ModelInfo) -> dict:
    spec = info.spec
    return {
        "name": info.name, "version": info.version, "versions": info.versions, "ready": info.ready,
        "kind": spec.kind, "latent_dim": spec.latent_dim, "prior": spec.prior, "class_names": list(spec.class_names),
        "image_shape": list(spec.output_shape), "provider": info.provider,
    }  # fmt: skip


# ---- request parsing: shapes and types only; the data plane judges values ----------------------------------------


def _split(body: bytes, header: str | None) -> tuple[bytes, bytes]:
    """The binary tensor extension: the first `header` bytes are JSON, the rest tensor bytes."""
    if header is None:
        return body, b""
    if not header.isascii() or not header.isdigit() or int(header) > len(body):
        raise InvalidArgument(f"{JSON_HEADER}: {short(header)} is not a length within the {len(body)}-byte body")
    return body[: int(header)], body[int(header) :]


def _json_object(data: bytes) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"request: the body is not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("request: the body must be a JSON object")
    return doc


def _json_inputs(items: object, rest: bytes) -> list[oip.Tensor]:
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
            if size % 4:
                raise InvalidArgument(f"{field}.parameters.binary_data_size: {size} bytes is not whole FP32 values")
            data = np.frombuffer(rest, "<f4", size // 4, offset)
            offset += size
        else:
            data = _json_values(item.get("data"), datatype, f"{field}.data")
        tensors.append(oip.Tensor(name, datatype, tuple(shape), data, field))
    if offset != len(rest):
        raise InvalidArgument(f"{JSON_HEADER}: {len(rest) - offset} bytes after the JSON belong to no input")
    return tensors


def _json_values(data: object, datatype: str, field: str) -> np.ndarray | None:
    if datatype != "FP32":
        return None  # refused by name in oip, before the values matter
    if not isinstance(data, list):
        raise InvalidArgument(f"{field}: must be a list of numbers (flat or nested, row-major)")
    try:
        values = np.asarray(data, dtype=np.float32).ravel()
    except (ValueError, TypeError):
        raise InvalidArgument(f"{field}: must hold numbers only, in lists of equal length") from None
    if not np.all(np.isfinite(values)):
        raise InvalidArgument(f"{field}: values must be finite")
    return values


def _json_outputs(items: object, binary_default: bool) -> tuple[list[oip.Requested], bool]:
    """The outputs asked for, and whether to answer in binary (Triton's extension) rather than JSON."""
    if not isinstance(items, list):
        raise InvalidArgument("outputs: must be a list")
    outputs, binary = [], binary_default
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidArgument(f"outputs[{i}]: must be an object with a name")
        parameters = _parameters(item.get("parameters", {}), f"outputs[{i}].parameters")
        binary = parameters.get("binary_data", binary) is True
        datatype = parameters.get("datatype")
        outputs.append(oip.Requested(item["name"], None if datatype is None else str(datatype)))
    return outputs, binary


def _parameters(value: object, field: str) -> Mapping[str, oip.Parameter]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: must be an object")
    for key, v in value.items():
        if not isinstance(v, (bool, int, float, str)):
            raise InvalidArgument(f"{field}: parameter {short(key, 32)} is not a boolean, number or string")
    return value


def _query(request: web.Request, known: tuple[str, ...]) -> Mapping[str, str]:
    for key in request.query:
        if key not in known:
            raise InvalidArgument(f"query: unknown parameter {short(key, 32)} (parameters: {', '.join(known)})")
        if len(request.query.getall(key)) > 1:
            raise InvalidArgument(f"{key}: given more than once")
    return request.query


def _int(text: str, field: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"{field}: an integer (got {short(text)})") from None


def _float(text: str, field: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument(f"{field}: a number (got {short(text)})") from None


def _label(text: str | None, soft: str | None, field: str) -> dm.Label | None:
    """`label` (a class index or name) or `soft` (comma-separated weights over the classes), or neither."""
    if text is not None and soft is not None:
        raise InvalidArgument(f"{field}: give a class or soft weights, not both")
    if soft is not None:
        try:
            return dm.Label(soft=tuple(float(w) for w in soft.split(",")))
        except ValueError:
            raise InvalidArgument(f"{field.replace('label', 'soft')}: comma-separated numbers") from None
    return oip.label_text(text) if text is not None else None


async def start(front: Front, host: str, port: int, ssl_context=None) -> tuple[web.AppRunner, int]:
    """Serve `front` on host:port ("[::]": every interface, IPv4 and IPv6); returns the runner and the port."""
    runner = web.AppRunner(front.app, access_log=None, handle_signals=False)
    await runner.setup()
    bind = None if host in ("[::]", "::", "") else host.strip("[]")
    site = web.TCPSite(runner, bind, port, ssl_context=ssl_context, reuse_address=True)
    await site.start()
    return runner, runner.addresses[0][1]
