"""gRPC servicer: protobuf ⇄ domain objects, nothing more. Errors are mapped to status codes in server.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.errors import InvalidArgument
from service.registry import ModelVersion, Registry
from service.sampling import Label, Output, Result, Sampler

FORMATS = {pb.OUTPUT_FORMAT_UNSPECIFIED: "png", pb.PNG: "png", pb.RAW_UINT8: "uint8", pb.RAW_FLOAT32: "float32"}
FORMAT_ENUMS = {"png": pb.PNG, "uint8": pb.RAW_UINT8, "float32": pb.RAW_FLOAT32}
METHODS = {pb.INTERPOLATION_METHOD_UNSPECIFIED: "slerp", pb.SLERP: "slerp", pb.LERP: "lerp"}


def model_info(mv: ModelVersion, versions: list[int]) -> pb.ModelInfo:
    spec = mv.spec
    return pb.ModelInfo(
        name=mv.name,
        versions=versions,
        version=mv.version,
        ready=True,
        latent_dim=spec.latent_dim,
        prior=spec.prior,
        class_names=spec.class_names,
        image_shape=spec.image_shape,
        output_min=spec.output_range[0],
        output_max=spec.output_range[1],
        provider=mv.session.provider,
        metadata=spec.metadata,
    )


def to_label(msg: pb.Label) -> Label:
    kind = msg.WhichOneof("kind")
    if kind == "index":
        return Label(index=msg.index)
    if kind == "name":
        return Label(name=msg.name)
    if kind == "soft":
        return Label(soft=tuple(msg.soft.weights))
    return Label()


def to_output(msg: pb.OutputOptions) -> Output:
    if msg.format not in FORMATS:
        raise InvalidArgument(f"output.format: unknown value {msg.format}")
    return Output(FORMATS[msg.format], msg.grid, msg.grid_columns, msg.return_latents, msg.grid_only)


def _check_count(field: str, count: int, limit: int, allow_zero: bool = False) -> None:
    if count == 0 and not allow_zero:
        raise InvalidArgument(f"{field}: empty")
    if count > limit:
        raise InvalidArgument(f"{field}: {count} requested, the limit per request is {limit}")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def to_response(mv: ModelVersion, result: Result, output: Output) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        model=mv.name,
        version=mv.version,
        format=FORMAT_ENUMS[output.format],
        image_shape=result.image_shape,
        images=result.images,
        grid_png=result.grid_png,
        latents=[] if result.latents is None else result.latents.ravel(),
        offset=result.offset,
    )


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, registry: Registry, sampler: Sampler):
        self.registry, self.sampler = registry, sampler

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models = []
        for name in sorted(self.registry.models):
            versions = sorted(self.registry.models[name])
            models.append(model_info(self.registry.get(name), versions))
        return pb.ListModelsResponse(models=models)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        mv = self.sampler.model(request.name, request.version)
        return model_info(mv, sorted(self.registry.models[mv.name]))

    async def _request(
        self, request: pb.GenerateRequest, limit: int
    ) -> tuple[ModelVersion, np.ndarray, list[Label], Output]:
        """Counts are checked against `limit` before anything is built from the request."""
        mv = self.sampler.model(request.model, request.version)
        output = to_output(request.output)
        kind = request.WhichOneof("latents")
        seeds = rows = None
        if kind == "seeds":
            _check_count("seeds.seeds", len(request.seeds.seeds), limit)
            seeds = list(request.seeds.seeds)
        elif kind == "seed_range":
            start, count = request.seed_range.start, request.seed_range.count
            _check_count("seed_range.count", count, limit)
            if start + count > 2**64:
                raise InvalidArgument("seed_range.start: the range runs past the largest seed, 2**64 - 1")
            seeds = range(start, start + count)
        elif kind == "rows":
            _check_count("rows.values", len(request.rows.values) // max(mv.spec.latent_dim, 1), limit)
            rows = np.asarray(request.rows.values, dtype=np.float32)
        _check_count("labels", len(request.labels), limit, allow_zero=True)
        z = await self.sampler.latents(mv, seeds, rows, "rows.values")
        return mv, z, [to_label(lab) for lab in request.labels], output

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        mv, z, labels, output = await self._request(request, self.sampler.limits.max_images)
        result = await self.sampler.generate(mv, z, labels, request.truncation, output, deadline_of(context))
        return to_response(mv, result, output)

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        mv, z, labels, output = await self._request(request, self.sampler.limits.max_stream_images)
        async for result in self.sampler.stream(mv, z, labels, request.truncation, output, deadline_of(context)):
            yield to_response(mv, result, output)

    async def Interpolate(self, request: pb.InterpolateRequest, context) -> pb.GenerateResponse:
        mv = self.sampler.model(request.model, request.version)
        output = to_output(request.output)
        if request.method not in METHODS:
            raise InvalidArgument(f"method: unknown value {request.method}")
        _check_count("keyframes", len(request.keyframes), self.sampler.limits.max_images)
        keys, labels = [], []
        for i, key in enumerate(request.keyframes):
            kind = key.WhichOneof("latent")
            if kind is None:
                raise InvalidArgument(f"keyframes[{i}]: give a seed or a row")
            seeds = [key.seed] if kind == "seed" else None
            rows = np.asarray(key.row.values, np.float32) if kind == "row" else None
            z = await self.sampler.latents(mv, seeds, rows, f"keyframes[{i}].row.values")
            if len(z) != 1:
                raise InvalidArgument(f"keyframes[{i}].row.values: exactly one row of {mv.spec.latent_dim} values")
            keys.append(z[0])
            labels.append(to_label(key.label) if key.HasField("label") else None)
        if all(lab is None for lab in labels):
            labels = []
        elif any(lab is None for lab in labels):
            raise InvalidArgument("keyframes.label: give a label for every keyframe or for none")
        result = await self.sampler.interpolate(
            mv, np.stack(keys) if keys else np.zeros((0, mv.spec.latent_dim), np.float32), labels,
            request.steps, METHODS[request.method], request.truncation, output, deadline_of(context),
        )  # fmt: skip
        return to_response(mv, result, output)
