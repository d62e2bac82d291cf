"""The ganserve.v1 Generator front end: protobuf → one domain request → the data plane → protobuf. It judges
nothing: validation lives in the data plane, and errors become status codes in the call gate (service/gate.py).

The data plane's field names are this API's own, so its requests need no renaming, only the advice for big answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from service import domain as dm
from service import gate
from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.dataplane import DataPlane
from service.errors import InvalidArgument

F = dm.Format
FORMATS = {pb.OUTPUT_FORMAT_UNSPECIFIED: F.PNG, pb.PNG: F.PNG, pb.RAW_UINT8: F.UINT8, pb.RAW_FLOAT32: F.FLOAT32}
FORMAT_ENUMS = {F.PNG: pb.PNG, F.UINT8: pb.RAW_UINT8, F.FLOAT32: pb.RAW_FLOAT32}
METHODS = {pb.INTERPOLATION_METHOD_UNSPECIFIED: "slerp", pb.SLERP: "slerp", pb.LERP: "lerp"}
ANIMATIONS = {pb.ANIMATION_FORMAT_UNSPECIFIED: "", pb.ANIMATION_FORMAT_GIF: "gif", pb.ANIMATION_FORMAT_APNG: "apng",
              pb.ANIMATION_FORMAT_WEBP: "webp"}  # fmt: skip
NAMES = dm.Names({"hint:stream": "use GenerateStream"})


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
    if msg.format not in FORMATS:  # an enum value this build does not know
        known = ", ".join(pb.OutputFormat.Name(k) for k in FORMAT_ENUMS.values())
        raise InvalidArgument(f"output.format: unknown value {msg.format} (formats: {known})")
    return dm.Output(FORMATS[msg.format], msg.grid, msg.grid_columns, msg.return_latents, msg.grid_only)


def to_latents(msg: pb.GenerateRequest | pb.EditRequest) -> dm.Seeds | dm.SeedRange | dm.Rows | None:
    kind = msg.WhichOneof("latents")
    if kind == "seeds":
        return dm.Seeds(msg.seeds.seeds)
    if kind == "seed_range":
        return dm.SeedRange(msg.seed_range.start, msg.seed_range.count)
    if kind == "rows":
        return dm.Rows(msg.rows.values)
    return None


def to_generate(msg: pb.GenerateRequest) -> dm.Generate:
    labels = Converted(msg.labels, to_label)
    return dm.Generate(msg.model, msg.version, to_latents(msg), labels, msg.truncation, to_output(msg.output), NAMES)


def to_animation(msg: pb.AnimationOptions) -> dm.Animation:
    return dm.Animation(ANIMATIONS.get(msg.format, str(msg.format)), msg.fps, msg.ping_pong, msg.loops)


def to_edit(msg: pb.EditRequest) -> dm.Edit:
    return dm.Edit(
        msg.model, msg.version, to_latents(msg), Converted(msg.labels, to_label), msg.direction,
        msg.vector.values if msg.HasField("vector") else None, msg.strengths, msg.truncation, to_output(msg.output),
        NAMES, to_animation(msg.animation) if msg.HasField("animation") else None,
    )  # fmt: skip


def to_keyframe(msg: pb.Keyframe) -> dm.Keyframe:
    kind = msg.WhichOneof("latent")
    return dm.Keyframe(
        seed=msg.seed if kind == "seed" else None,
        row=msg.row.values if kind == "row" else None,
        label=to_label(msg.label) if msg.HasField("label") else None,
    )


def to_interpolate(msg: pb.InterpolateRequest) -> dm.Interpolate:
    animation = to_animation(msg.animation) if msg.HasField("animation") else None
    return dm.Interpolate(
        msg.model, msg.version, Converted(msg.keyframes, to_keyframe), msg.steps,
        METHODS.get(msg.method, str(msg.method)), msg.truncation, to_output(msg.output), NAMES, animation,
        Converted(msg.more_paths, lambda path: Converted(path.keyframes, to_keyframe)),
    )  # fmt: skip


def from_info(info: dm.ModelInfo) -> pb.ModelInfo:
    spec = info.spec
    return pb.ModelInfo(
        name=info.name,
        versions=info.versions,
        version=info.version,
        ready=True,  # a version that is described serves
        latent_dim=spec.latent_dim,
        prior=spec.prior,
        class_names=spec.class_names,
        image_shape=spec.output_shape,
        output_min=spec.output_range[0],
        output_max=spec.output_range[1],
        provider=info.provider,
        metadata=info.metadata,
        invertible=info.invertible,
        directions=[
            pb.Direction(
                name=d.name, kind=d.kind, description=d.description, vector=d.vector, per_class=bool(d.per_class)
            )
            for d in spec.directions
        ],
    )


def from_result(result: dm.Result) -> pb.GenerateResponse:
    images = result.pngs if result.pixels is None else [image.tobytes() for image in result.pixels]
    return pb.GenerateResponse(
        model=result.model,
        version=result.version,
        format=FORMAT_ENUMS[result.format],
        image_shape=result.image_shape,
        images=images,
        grid_png=result.grid_png,
        latents=[] if result.latents is None else result.latents.ravel(),
        offset=result.offset,
        animation=result.animation,
        animation_type=result.animation_type,
    )


def from_inverted(answer: dm.Inverted) -> pb.InvertResponse:
    images = from_result(answer.reconstructions)
    inversions = [
        pb.Inversion(
            z=answer.z[i], label=0 if answer.labels is None else int(answer.labels[i]),
            class_probabilities=[] if answer.probabilities is None else answer.probabilities[i],
            distance=answer.distance[i], encoder_distance=answer.encoder_distance[i], passes=answer.passes,
        )
        for i in range(len(answer.z))
    ]  # fmt: skip
    return pb.InvertResponse(model=images.model, version=images.version, inversions=inversions, format=images.format,
                             image_shape=images.image_shape, reconstructions=images.images)  # fmt: skip


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[from_info(info) for info in self.plane.list_models()])

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        return from_info(self.plane.get_model(request.name, request.version, dm.Names({"model": "name"})))

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        return from_result(await self.plane.generate(to_generate(request), gate.deadline()))

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        # aclosing: a call that ends early releases the model version now, not when the generator is collected.
        async with contextlib.aclosing(self.plane.stream(to_generate(request), gate.deadline())) as results:
            async for result in results:
                yield from_result(result)

    async def Interpolate(self, request: pb.InterpolateRequest, context) -> pb.GenerateResponse:
        return from_result(await self.plane.interpolate(to_interpolate(request), gate.deadline()))

    async def Edit(self, request: pb.EditRequest, context) -> pb.GenerateResponse:
        return from_result(await self.plane.edit(to_edit(request), gate.deadline()))

    async def Invert(self, request: pb.InvertRequest, context) -> pb.InvertResponse:
        invert = dm.Invert(request.model, request.version, request.images, request.pixels, request.refine_passes,
                           to_output(request.output), NAMES)  # fmt: skip
        return from_inverted(await self.plane.invert(invert, gate.deadline()))
