"""For people and `<img>` tags: PNG grids and interpolation strips from query strings, the model list the
playground's pickers read, the playground itself, and /metrics. Each route turns its query into one domain
request whose Names are the query's own parameters, so that errors name what the caller wrote."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from service import domain as dm
from service import gate
from service.dataplane import DataPlane
from service.errors import InvalidArgument, short
from service.frontends import text
from service.http import Route

SERVICE = "ganserve.v1.Generator"  # the role its routes need: the same as ganserve.v1 over gRPC
PLAYGROUND = {"/": ("index.html", "text/html"), "/playground.js": ("playground.js", "text/javascript"),
              "/playground.css": ("playground.css", "text/css")}  # fmt: skip
# The page loads its own script and style only, and images from this origin or blobs it made from them.
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'"
IMAGE_QUERY = ("seeds", "label", "soft", "psi", "columns", "version")
STRIP_QUERY = (
    "from", "to", "from_z", "to_z", "steps", "from_label", "to_label", "from_soft", "to_soft", "psi", "method",
    "version",
)  # fmt: skip
ANIMATION_QUERY = ("fps", "ping_pong", "loops", "columns")  # interpolation.gif, .apng and .webp
EDIT_QUERY = ("seeds", "label", "soft", "direction", "vector", "strengths", "psi", "columns", "version")
INTERPOLATION = "/v1/models/{model}/interpolation.{kind:png|gif|apng|webp}"  # a strip, or the frames animated
EDIT = "/v1/models/{model}/edit.{kind:png|gif|apng|webp}"  # a grid, or the strengths animated
GRID = dm.Output(dm.Format.PNG, grid=True, grid_only=True)


class Pages:
    def __init__(self, plane: DataPlane, metrics: CollectorRegistry):
        self.plane, self.metrics = plane, metrics
        self.files = {path: _asset(*asset) for path, asset in PLAYGROUND.items()}

    def routes(self) -> list[Route]:
        pages = [Route(f"page:{name}", "GET", path, self.playground, None) for path, (name, _) in PLAYGROUND.items()]
        return [
            Route("models", "GET", "/v1/models", self.models, SERVICE),
            Route("images", "GET", "/v1/models/{model}/images.png", self.images, SERVICE),
            Route("interpolation", "GET", INTERPOLATION, self.interpolation, SERVICE),
            Route("edit", "GET", EDIT, self.edit, SERVICE),
            Route("invert", "POST", "/v1/models/{model}/invert", self.invert, SERVICE),
            Route("metrics", "GET", "/metrics", self.prometheus, SERVICE, traced=False),  # scrapes make no spans
            *pages,
        ]

    async def models(self, request: web.Request) -> web.Response:
        """Every model as ganserve.v1's ListModels describes it, for the playground's pickers."""
        return web.json_response({"models": [_model_json(info) for info in self.plane.list_models()]})

    async def images(self, request: web.Request) -> web.Response:
        """A PNG grid: ?seeds=0-15&label=7&psi=0.7&columns=4 (or soft=w0,w1,... for blended classes)."""
        q = _query(request, IMAGE_QUERY)
        seeds = text.seeds(q.get("seeds", "0"), "seeds")
        label = _label(q, "label", "soft")
        output = dm.Output(dm.Format.PNG, grid=True, grid_columns=text.integer(q.get("columns", "0"), "columns"),
                           grid_only=True)  # fmt: skip
        names = {"model": "model", "version": "version", "latents": "seeds", "seeds": "seeds", "seed_range": "seeds",
                 "truncation": "psi", "output.grid_columns": "columns",
                 "labels": "soft" if "soft" in q else "label"}  # fmt: skip
        generate = dm.Generate(
            request.match_info["model"], text.version(q.get("version", ""), "version"), seeds,
            [label] if label else [], text.number(q.get("psi", "0"), "psi"), output, dm.Names(names),
        )  # fmt: skip
        return _png(await self.plane.generate(generate, gate.deadline()))

    async def interpolation(self, request: web.Request) -> web.Response:
        """A PNG strip of frames from seed to seed: ?from=0&to=1&steps=8&from_label=3&to_label=5&psi=0.7; as
        interpolation.gif, .apng or .webp, the frames animated (&fps=12&ping_pong=1&loops=0). Several seeds
        (from=3,5&to=11,9, and a class each or one for all) make several interpolations, a row each in the strip
        and side by side in the animation (&columns=2). An end may be a latent instead of a seed: from_z=v1,...,vd
        (what Invert answers), for one interpolation."""
        kind = request.match_info["kind"]
        q = _query(request, STRIP_QUERY + (ANIMATION_QUERY if kind != "png" else ()))
        ends = ("from", "to")
        for end in ends:
            if end in q and f"{end}_z" in q:
                raise InvalidArgument(f"{end}_z: give {end} (a seed) or {end}_z (a latent), not both")
        seeds = {end: [text.integer(v, end) for v in q.get(end, str(i)).split(",")] for i, end in enumerate(ends)}
        if len(seeds["to"]) != len(seeds["from"]):
            raise InvalidArgument(f"to: {len(seeds['to'])} seeds, as many as from ({len(seeds['from'])}) needed")
        labels = {end: _labels(q, end, len(seeds[end])) for end in ends}
        rows = {end: text.numbers(q[f"{end}_z"], f"{end}_z") for end in ends if f"{end}_z" in q}
        paths = [
            [dm.Keyframe(seed=None if end in rows else seeds[end][p], row=rows.get(end), label=labels[end][p])
             for end in ends]
            for p in range(len(seeds["from"]))
        ]  # fmt: skip
        given = {end: f"{end}_soft" if f"{end}_soft" in q else f"{end}_label" for end in ends}
        # A label at one end only: the message names the end that lacks one.
        lacking = given["to"] if given["from"] in q else given["from"]
        names = {"model": "model", "version": "version", "keyframes[0]": "from", "keyframes[1]": "to",
                 "keyframes[0].row.values": "from_z", "keyframes[1].row.values": "to_z",
                 "keyframes": given["from"], "truncation": "psi", "keyframes.label[0]": given["from"],
                 "keyframes.label[1]": given["to"], "keyframes.label": lacking, "animation": "steps",
                 "animation.fps": "fps", "animation.loops": "loops", "output.grid_columns": "columns",
                 "more_paths": "from"}  # fmt: skip
        columns = text.integer(q.get("columns", "0"), "columns")
        interpolate = dm.Interpolate(
            request.match_info["model"], text.version(q.get("version", ""), "version"), paths[0],
            text.integer(q.get("steps", "8"), "steps"), q.get("method", "slerp"), text.number(q.get("psi", "0"), "psi"),
            dataclasses.replace(GRID, grid_columns=columns), dm.Names(names), _animation(q, kind), paths[1:],
        )  # fmt: skip
        return _image(await self.plane.interpolate(interpolate, gate.deadline()))

    async def edit(self, request: web.Request) -> web.Response:
        """A PNG grid of seeds moved along a direction, a row per seed and a column per strength:
        ?seeds=0-3&label=7&direction=slant&strengths=-3,-1.5,0,1.5,3 (or vector=v1,...,vd, a direction of your own);
        as edit.gif, .apng or .webp, the strengths animated, each frame a grid of the seeds (&columns=2&fps=...)."""
        kind = request.match_info["kind"]
        q = _query(request, EDIT_QUERY + (ANIMATION_QUERY if kind != "png" else ()))
        label = _label(q, "label", "soft")
        vector = text.numbers(q["vector"], "vector") if "vector" in q else None
        names = {"model": "model", "version": "version", "latents": "seeds", "seeds": "seeds", "seed_range": "seeds",
                 "truncation": "psi", "output.grid_columns": "columns", "labels": "soft" if "soft" in q else "label",
                 "vector": "vector", "animation": "strengths", "animation.fps": "fps",
                 "animation.loops": "loops"}  # fmt: skip
        edit = dm.Edit(
            request.match_info["model"], text.version(q.get("version", ""), "version"),
            text.seeds(q.get("seeds", "0"), "seeds"), [label] if label else [], q.get("direction", ""), vector,
            text.numbers(q.get("strengths", text.STRENGTHS), "strengths"), text.number(q.get("psi", "0"), "psi"),
            dataclasses.replace(GRID, grid_columns=text.integer(q.get("columns", "0"), "columns")), dm.Names(names),
            _animation(q, kind),
        )  # fmt: skip
        return _image(await self.plane.edit(edit, gate.deadline()))

    async def invert(self, request: web.Request) -> web.Response:
        """The body, one image file (a PNG of the model's size), back to its z: ?refine=500&version=. JSON: z, the
        class, distances, passes, and the reconstruction as a base64 PNG."""
        q = _query(request, ("refine", "version"))
        body = await request.read()
        names = {
            "model": "model",
            "version": "version",
            "images": "body",
            "images[0]": "body",
            "refine_passes": "refine",
        }
        invert = dm.Invert(
            request.match_info["model"], text.version(q.get("version", ""), "version"), [body],
            refine=text.integer(q.get("refine", "0"), "refine"), names=dm.Names(names),
        )  # fmt: skip
        answer = await self.plane.invert(invert, gate.deadline())
        result = answer.reconstructions
        out = {
            "model": result.model, "version": result.version, "z": answer.z[0].tolist(),
            "distance": float(answer.distance[0]), "encoder_distance": float(answer.encoder_distance[0]),
            "passes": answer.passes, "reconstruction": base64.b64encode(result.pngs[0]).decode(),
        }  # fmt: skip
        if answer.labels is not None:
            out |= {"label": int(answer.labels[0]), "probabilities": answer.probabilities[0].round(5).tolist()}
        return web.json_response(out, headers={"X-Model": result.model, "X-Model-Version": str(result.version)})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def playground(self, request: web.Request) -> web.Response:
        body, content_type = self.files[request.path]
        return web.Response(
            body=body, content_type=content_type, charset="utf-8",
            headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
        )  # fmt: skip


def _asset(name: str, content_type: str) -> tuple[bytes, str]:
    return resources.files("service").joinpath("playground", name).read_bytes(), content_type


def _animation(q: Mapping[str, str], kind: str) -> dm.Animation | None:
    """The animation query of an .gif, .apng or .webp route; None for .png."""
    if kind == "png":
        return None
    fps, loops = text.number(q.get("fps", "0"), "fps"), text.integer(q.get("loops", "0"), "loops")
    return dm.Animation(kind, fps, text.boolean(q.get("ping_pong", "0"), "ping_pong"), loops)


def _image(result: dm.Result) -> web.Response:
    """The grid, or the animation when one was asked for."""
    if not result.animation:
        return _png(result)
    return web.Response(
        body=result.animation, content_type=result.animation_type,
        headers={"X-Model": result.model, "X-Model-Version": str(result.version)},
    )  # fmt: skip


def _png(result: dm.Result) -> web.Response:
    return web.Response(
        body=result.grid_png, content_type="image/png",
        headers={"X-Model": result.model, "X-Model-Version": str(result.version)},
    )  # fmt: skip


def _model_json(info: dm.ModelInfo) -> dict:
    spec = info.spec
    return {
        "name": info.name, "version": info.version, "versions": info.versions, "ready": True,
        "kind": spec.kind, "latent_dim": spec.latent_dim, "prior": spec.prior, "class_names": list(spec.class_names),
        "image_shape": list(spec.output_shape), "provider": info.provider, "invertible": info.invertible,
        "directions": [{"name": d.name, "kind": d.kind, "description": d.description, "per_class": bool(d.per_class)}
                       for d in spec.directions],
    }  # fmt: skip


def _query(request: web.Request, known: tuple[str, ...]) -> Mapping[str, str]:
    for key in request.query:
        if key not in known:
            raise InvalidArgument(f"query: unknown parameter {short(key, 32)} (parameters: {', '.join(known)})")
        if len(request.query.getall(key)) > 1:
            raise InvalidArgument(f"{key}: given more than once")
    return request.query


def _labels(q: Mapping[str, str], end: str, n: int) -> list[dm.Label | None]:
    """One end's class for each of n paths: `{end}_label` as one class for all or a comma-separated one each, or
    `{end}_soft` (one set of weights, for all)."""
    name = f"{end}_label"
    if name in q and "," in q[name] and f"{end}_soft" not in q:
        given = [text.label(v.strip()) for v in q[name].split(",")]
        if len(given) != n:
            raise InvalidArgument(f"{name}: {len(given)} classes for {n} seeds: give one, or one per seed")
        return given
    return [_label(q, name, f"{end}_soft")] * n


def _label(q: Mapping[str, str], name: str, soft: str) -> dm.Label | None:
    """`name` (a class index or name) or `soft` (comma-separated weights over the classes), or neither."""
    if name in q and soft in q:
        raise InvalidArgument(f"{name}: give a class or soft weights, not both")
    if soft in q:
        return text.soft(q[soft], soft)
    return text.label(q[name]) if name in q else None
