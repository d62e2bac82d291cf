"""The ganserve.v1 front ends: protobuf → one domain request → the data plane (or, for ModelAdmin, the registry)
→ protobuf. They judge nothing.

Validation lives in the data plane; errors become status codes in the interceptor (service/interceptor.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from service import domain as dm
from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.dataplane import DataPlane
from service.registry import Registry

FORMATS = {pb.OUTPUT_FORMAT_UNSPECIFIED: "png", pb.PNG: "png", pb.RAW_UINT8: "uint8", pb.RAW_FLOAT32: "float32"}
FORMAT_ENUMS = {"png": pb.PNG, "uint8": pb.RAW_UINT8, "float32": pb.RAW_FLOAT32}
METHODS = {pb.INTERPOLATION_METHOD_UNSPECIFIED: "slerp", pb.SLERP: "slerp", pb.LERP: "lerp"}
STATES = {name: pb.VersionState.Value(f"VERSION_STATE_{name}") for name in
          ("AVAILABLE", "LOADING", "READY", "UNLOADING", "FAILED")}  # fmt: skip


class Converted(Sequence):
    """A read-only view of a repeated field that converts items as they are read, so that the data plane can
    refuse an oversized request by its length before any item is built."""

    def __init__(self, items: Sequence, convert: Callable):
        self.items, self.convert = items, convert

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.convert(self.items[i])


def to_label(msg: pb.Label) -> dm.Label:
    kind = msg.WhichOneof("kind")
    if kind == "index":
        return dm.Label(index=msg.index)
    if kind == "name":
        return dm.Label(name=msg.name)
    if kind == "soft":
        return dm.Label(soft=tuple(msg.soft.weights))
    return dm.Label()


def to_output(msg: pb.OutputOptions) -> dm.Output:
    # An enum value this build does not know is passed on as its number, for the data plane to refuse.
    fmt = FORMATS.get(msg.format, str(msg.format))
    return dm.Output(fmt, msg.grid, msg.grid_columns, msg.return_latents, msg.grid_only)


def to_generate(msg: pb.GenerateRequest) -> dm.Generate:
    kind = msg.WhichOneof("latents")
    latents = None
    if kind == "seeds":
        latents = dm.Seeds(msg.seeds.seeds)
    elif kind == "seed_range":
        latents = dm.SeedRange(msg.seed_range.start, msg.seed_range.count)
    elif kind == "rows":
        latents = dm.Rows(msg.rows.values)
    labels = Converted(msg.labels, to_label)
    return dm.Generate(msg.model, msg.version, latents, labels, msg.truncation, to_output(msg.output))


def to_keyframe(msg: pb.Keyframe) -> dm.Keyframe:
    kind = msg.WhichOneof("latent")
    return dm.Keyframe(
        seed=msg.seed if kind == "seed" else None,
        row=msg.row.values if kind == "row" else None,
        label=to_label(msg.label) if msg.HasField("label") else None,
    )


def to_interpolate(msg: pb.InterpolateRequest) -> dm.Interpolate:
    return dm.Interpolate(
        msg.model, msg.version, Converted(msg.keyframes, to_keyframe), msg.steps,
        METHODS.get(msg.method, str(msg.method)), msg.truncation, to_output(msg.output),
    )  # fmt: skip


def from_info(info: dm.ModelInfo) -> pb.ModelInfo:
    spec = info.spec
    return pb.ModelInfo(
        name=info.name,
        versions=info.versions,
        version=info.version,
        ready=info.ready,
        latent_dim=spec.latent_dim,
        prior=spec.prior,
        class_names=spec.class_names,
        image_shape=spec.output_shape,
        output_min=spec.output_range[0],
        output_max=spec.output_range[1],
        provider=info.provider,
        metadata=info.metadata,
    )


def from_result(result: dm.Result) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        model=result.model,
        version=result.version,
        format=FORMAT_ENUMS[result.format],
        image_shape=result.image_shape,
        images=result.images,
        grid_png=result.grid_png,
        latents=[] if result.latents is None else result.latents.ravel(),
        offset=result.offset,
    )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the batcher's clock (time.monotonic), or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[from_info(info) for info in self.plane.list_models()])

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        return from_info(self.plane.get_model(request.name, request.version))

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        return from_result(await self.plane.generate(to_generate(request), deadline_of(context)))

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        # aclosing: a call that ends early releases the model version now, not when the generator is collected.
        async with contextlib.aclosing(self.plane.stream(to_generate(request), deadline_of(context))) as results:
            async for result in results:
                yield from_result(result)

    async def Interpolate(self, request: pb.InterpolateRequest, context) -> pb.GenerateResponse:
        return from_result(await self.plane.interpolate(to_interpolate(request), deadline_of(context)))


def from_statuses(statuses: Sequence[dm.VersionStatus]) -> list[pb.VersionStatus]:
    return [pb.VersionStatus(name=s.name, version=s.version, state=STATES[s.state], reason=s.reason) for s in statuses]


class ModelAdminServicer(pb_grpc.ModelAdminServicer):
    def __init__(self, registry: Registry):
        self.registry = registry

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        statuses = [s for s in self.registry.status() if s.state == "READY" or not request.ready_only]
        return pb.RepositoryIndexResponse(versions=from_statuses(statuses))

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.ModelStatus:
        statuses = await self.registry.load_model(request.name, request.version)
        return pb.ModelStatus(name=request.name, versions=from_statuses(statuses))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.ModelStatus:
        statuses = await self.registry.unload_model(request.name, request.version)
        return pb.ModelStatus(name=request.name, versions=from_statuses(statuses))
