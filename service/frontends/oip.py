"""The Open Inference Protocol (KServe v2): what its tensors and parameters mean, once for both of its wires.

The gRPC servicer (oip_grpc) and the REST routes (oip_rest) differ only in how tensors travel (protobuf contents or
raw bytes; JSON or the binary extension); each turns its request into Tensors and parameters, and this module
turns those into one domain request, and the domain's answer into output tensors. A generator is described as
tensors: inputs `z` FP32 [-1, latent_dim] and, for conditional models, `y` FP32 [-1, classes], passed to the model
as given; one output, `images` FP32 [-1, C, H, W] in the model's range (UINT8 [-1, H, W, C] through the output
parameter `datatype`). Instead of tensors, a request may give seeds and labels as parameters; they follow the seed
contract of ganserve.v1, so the same seeds give the same bytes through either API. The standard `timeout`
parameter (microseconds, as Triton reads it) is the call's deadline, and `priority` has two levels, as Triton
numbers them with two: 1 goes ahead of every request at 2, the default level (0 means the default).

Inversion (a version served with an encoder: the metadata parameter `invertible`): an input `images` UINT8
[n, H, W, C], the pixels as the model draws them (mnist-cdcgan: [n, 28, 28, 1]), alone, without z, y, seeds or
labels, is turned back into latents as ganserve.v1's Invert does; the parameter `refine` (an integer, 0 to 10,000,
default 0) is its refine_passes, generator passes per image after the encoder. The answer has several output
tensors, each a row per image: `z` FP32 [n, latent_dim], `label` INT64 [n] and `probabilities` FP32 [n, classes]
(conditional models only), `distance` and `encoder_distance` FP32 [n] (mean squared pixel difference in [0, 1],
after the refinement and for the encoder's z), and `images`, the reconstructions, FP32 or UINT8 as for generation.
The passes the refinement used, one count for the request, are the response parameter `passes` (int64). A request
that lists outputs gets those, in its order; otherwise all (the metadata keeps describing generation: z, y and
images). `priority` counts as for generation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as package_metadata
from typing import TYPE_CHECKING

import numpy as np

from service import domain as dm
from service import gate
from service.errors import InvalidArgument, short
from service.frontends import text

if TYPE_CHECKING:
    from service.dataplane import DataPlane

SERVER_NAME = "gan-serve"
EXTENSIONS = ["binary_tensor_data"]  # the REST binary extension, as Triton names it
PLATFORM = "onnxruntime_onnx"
OUTPUT = "images"
# "datatype" asks for UINT8 images for the whole request, for clients that cannot set output parameters.
SEED_PARAMETERS = (
    "seeds", "seed_start", "count", "labels", "truncation", "datatype", "timeout", "priority", "direction", "strengths",
    "refine",
)  # fmt: skip
# Standard parameters that change nothing here; anything else unknown is refused, so a typo never passes silently.
IGNORED_PARAMETERS = ("binary_data_output",)
PRIORITIES = {0: False, 1: True, 2: False}  # the `priority` parameter → urgent
OUTPUT_DATATYPES = {"FP32": dm.Format.FLOAT32, "UINT8": dm.Format.UINT8}
GRPC_FIELDS = ("model_name", "model_version")  # how errors name the model and version of a ModelInfer
# An inversion's outputs and their datatypes, in the order of an answer that lists none (images: as asked).
INVERSION_OUTPUTS = {
    "z": "FP32", "label": "INT64", "probabilities": "FP32", "distance": "FP32", "encoder_distance": "FP32",
    OUTPUT: None,
}  # fmt: skip
CONDITIONAL_OUTPUTS = ("label", "probabilities")  # answered by conditional models only
# Parameters of generation that an images tensor (an inversion) does not take; `refine` is inversion's alone.
GENERATION_ONLY = ("seeds", "seed_start", "count", "labels", "truncation", "direction", "strengths")

Parameter = bool | int | float | str


def server_version() -> str:
    try:
        return package_metadata.version("gan-serve")
    except package_metadata.PackageNotFoundError:
        return "0"


@dataclass(frozen=True)
class Tensor:
    """One input tensor, wire-neutral: `data` is its flat values (None until read), `field` names it in errors."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | None
    field: str


@dataclass(frozen=True)
class Requested:
    """An output the client asked for, in FP32 or UINT8 (None: as the request says)."""

    name: str
    datatype: str | None = None


@dataclass(frozen=True)
class Request:
    """One ModelInfer as the data plane takes it, the outputs it asked for (datatypes resolved, in its order; empty:
    all of an inversion's), its own timeout in seconds, and for an inversion its images tensor."""

    domain: dm.Generate | dm.Infer | dm.Edit | dm.Invert
    want: tuple[Requested, ...]
    timeout: float | None
    images: Tensor | None = None


@dataclass(frozen=True)
class Output:
    """One output tensor of an answer: `values` little-endian in its datatype, row-major, in its shape."""

    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray


@dataclass(frozen=True)
class Answer:
    """A ModelInfer's answer, wire-neutral: its output tensors in order, and its response parameters."""

    model: str
    version: int
    outputs: list[Output]
    parameters: dict[str, Parameter]


def model_metadata(info: dm.ModelInfo) -> dict:
    """ModelMetadataResponse as the REST JSON; the gRPC servicer converts the same dict."""
    spec = info.spec
    inputs = [{"name": name, "datatype": "FP32", "shape": shape} for name, shape in info.inputs]
    output = {"name": OUTPUT, "datatype": "FP32", "shape": info.output_shape}
    parameters: dict[str, Parameter] = {
        "latent_dim": spec.latent_dim, "prior": spec.prior, "class_names": ",".join(spec.class_names),
        "kind": spec.kind, "version": info.version, "provider": info.provider,
        "output_min": spec.output_range[0], "output_max": spec.output_range[1],
        "output_datatypes": ",".join(OUTPUT_DATATYPES), "directions": ",".join(d.name for d in spec.directions),
        "invertible": info.invertible,
    }  # fmt: skip
    parameters |= {k: v for k, v in info.metadata.items() if k not in parameters}
    return {
        "name": info.name, "versions": [str(v) for v in info.versions], "platform": PLATFORM,
        "inputs": inputs, "outputs": [output], "parameters": parameters,
    }  # fmt: skip


def request(
    model: str, version: str, parameters: Mapping[str, Parameter], inputs: Sequence[Tensor],
    outputs: Sequence[Requested], fields: tuple[str, str] = GRPC_FIELDS,
) -> Request:  # fmt: skip
    """One ModelInfer → the domain request. Tensors: z (and y) go to the model as given, checked against it once by
    the data plane; seeds and labels as parameters follow the seed contract; an images tensor inverts. Errors name
    this request's fields."""
    for key in parameters:
        if key not in SEED_PARAMETERS and key not in IGNORED_PARAMETERS:
            known = ", ".join(SEED_PARAMETERS)
            raise InvalidArgument(f"parameters: unknown parameter {short(key, 32)} (parameters: {known})")
    by_name = _inputs_by_name(inputs)
    number = text.version(version, fields[1])
    if "images" in by_name:
        return _inversion(model, number, parameters, by_name, outputs, fields)
    if "refine" in parameters:
        raise InvalidArgument("parameters.refine: applies to inversion only (an images tensor)")
    seeded = [key for key in ("seeds", "seed_start", "count") if key in parameters]
    want = _requested(outputs, str(parameters.get("datatype", "FP32")))
    output = dm.Output(format=OUTPUT_DATATYPES[want.datatype])
    psi = _number(parameters.get("truncation", 0.0), "parameters.truncation")
    timeout = _timeout(parameters.get("timeout"))
    urgent = _priority(parameters.get("priority", 0))
    names = {"model": fields[0], "version": fields[1], "output": "outputs", "truncation": "parameters.truncation"}
    if "z" in by_name:
        if seeded:
            raise InvalidArgument(f"parameters.{seeded[0]}: give seeds or a z tensor, not both")
        z = _array(by_name["z"])
        for name, t in by_name.items():
            names |= {name: t.field, f"{name}.shape": f"{t.field}.shape"}
        names |= {"rows.values": by_name["z"].field, "latents": by_name["z"].field}
        if not {"labels", "direction", "strengths"} & set(parameters):
            y = _array(by_name["y"]) if "y" in by_name else None
            names.setdefault("y", "inputs")
            return Request(dm.Infer(model, number, z, y, psi, output, dm.Names(names), urgent), (want,), timeout)
        if "y" in by_name:
            given = "labels" if "labels" in parameters else "direction"
            raise InvalidArgument(f"parameters.{given}: give labels as parameters with it, not a y tensor")
        latents: dm.Seeds | dm.SeedRange | dm.Rows = dm.Rows(z.ravel())
    else:
        if "y" in by_name:
            raise InvalidArgument("inputs: y needs z; or give seeds and labels as parameters")
        latents = _seeds(parameters)
        given = "parameters.seeds" if "seeds" in parameters else None  # a range a-b in `seeds` is a SeedRange
        names |= {
            "latents": given or "parameters.count", "seeds.seeds": "parameters.seeds",
            "seed_range.start": given or "parameters.seed_start", "seed_range.count": given or "parameters.count",
        }  # fmt: skip
    labels = text.labels(parameters["labels"], "parameters.labels") if "labels" in parameters else ()
    names["labels"] = "parameters.labels"
    if "direction" in parameters or "strengths" in parameters:
        direction = parameters.get("direction", "")
        if not isinstance(direction, str):
            raise InvalidArgument(f"parameters.direction: a name (got {type(direction).__name__})")
        strengths = text.numbers(parameters.get("strengths", text.STRENGTHS), "parameters.strengths")
        names |= {"direction": "parameters.direction", "strengths": "parameters.strengths"}
        edit = dm.Edit(model, number, latents, labels, direction, None, strengths, psi, output, dm.Names(names),
                       urgent=urgent)  # fmt: skip
        return Request(edit, (want,), timeout)
    generate = dm.Generate(model, number, latents, labels, psi, output, dm.Names(names), urgent)
    return Request(generate, (want,), timeout)


def deadline(req: Request) -> float | None:
    """The call's deadline, its own `timeout` (if any) applied first: both wires enforce it alike."""
    call = gate.current()
    if req.timeout is not None:
        call.limit(req.timeout, f"parameters.timeout ({req.timeout:g} s)")
    return call.deadline


async def answer(plane: DataPlane, req: Request) -> Answer:
    """Run the request on the data plane: its answer as output tensors. An inversion's images tensor and the outputs
    it lists are checked against the model version first (its shape; label and probabilities: conditional only)."""
    if isinstance(req.domain, dm.Invert):
        info = plane.get_model(req.domain.model, req.domain.version, req.domain.names)
        if info.invertible:  # else the data plane says why it serves no inversion
            _check_inversion(info, req)
        return outcome(await plane.invert(req.domain, deadline(req)), req.want)
    return outcome(await plane.run(req.domain, deadline(req)), req.want)


def outcome(result: dm.Result | dm.Inverted, want: Sequence[Requested]) -> Answer:
    """The answer's output tensors, as `want` lists them (a generation: its one, `images`); an inversion's all when it
    lists none, label and probabilities only for a conditional model."""
    if isinstance(result, dm.Result):
        (one,) = want
        return Answer(result.model, result.version, [_images(result, one.datatype)], {})
    images = result.reconstructions
    rows = {
        "z": (result.z, "<f4"), "label": (result.labels, "<i8"), "probabilities": (result.probabilities, "<f4"),
        "distance": (result.distance, "<f4"), "encoder_distance": (result.encoder_distance, "<f4"),
    }  # fmt: skip
    if not want:
        want = [Requested(name, datatype) for name, datatype in INVERSION_OUTPUTS.items()
                if name == OUTPUT or rows[name][0] is not None]  # fmt: skip
    outputs = []
    for i, w in enumerate(want):
        if w.name == OUTPUT:
            outputs.append(_images(images, w.datatype or _datatype(images.format)))
            continue
        array, dtype = rows[w.name]
        if array is None:
            raise InvalidArgument(f"outputs[{i}].name: model {images.model!r} is unconditional: it has no {w.name}")
        outputs.append(Output(w.name, INVERSION_OUTPUTS[w.name], list(array.shape), np.ascontiguousarray(array, dtype)))
    return Answer(images.model, images.version, outputs, {"passes": result.passes})


def _images(result: dm.Result, datatype: str) -> Output:
    return Output(OUTPUT, datatype, [len(result.pixels), *result.image_shape], result.pixels)


def _datatype(fmt: dm.Format) -> str:
    return next(name for name, f in OUTPUT_DATATYPES.items() if f is fmt)


def _inversion(
    model: str, number: int, parameters: Mapping[str, Parameter], by_name: Mapping[str, Tensor],
    outputs: Sequence[Requested], fields: tuple[str, str],
) -> Request:  # fmt: skip
    """An images tensor: an Invert of its pixels, with the outputs it lists (datatypes resolved), or all."""
    images = by_name["images"]
    for name, t in by_name.items():
        if name != "images":
            raise InvalidArgument(
                f"{t.field}.name: input {name!r} does not go with an images tensor, which inverts: give images "
                "alone, or z (and y) to generate"
            )  # fmt: skip
    for key in GENERATION_ONLY:
        if key in parameters:
            raise InvalidArgument(
                f"parameters.{key}: does not apply to an images tensor, which inverts: give {key} or images, not both"
            )  # fmt: skip
    _array(images)
    datatype = str(parameters.get("datatype", "FP32"))
    if datatype not in OUTPUT_DATATYPES:
        known = ", ".join(OUTPUT_DATATYPES)
        raise InvalidArgument(f"parameters.datatype: {short(datatype)} is not one of {known}")
    want = _inversion_outputs(outputs, datatype)
    image_datatype = next((w.datatype for w in want if w.name == OUTPUT), datatype)
    refine = _integer(parameters.get("refine", 0), "parameters.refine")
    timeout = _timeout(parameters.get("timeout"))
    urgent = _priority(parameters.get("priority", 0))
    names = {
        "model": fields[0], "version": fields[1], "output": "outputs", "images": images.field,
        "pixels": images.field, "refine_passes": "parameters.refine",
    }  # fmt: skip
    invert = dm.Invert(model, number, pixels=images.data.tobytes(), refine=refine,
                       output=dm.Output(format=OUTPUT_DATATYPES[image_datatype]), names=dm.Names(names),
                       urgent=urgent)  # fmt: skip
    return Request(invert, want, timeout, images)


def _inversion_outputs(outputs: Sequence[Requested], datatype: str) -> tuple[Requested, ...]:
    """The outputs an inversion lists, each known and once, with its datatype; () for all."""
    want, seen = [], set()
    for i, o in enumerate(outputs):
        if o.name not in INVERSION_OUTPUTS:
            known = ", ".join(INVERSION_OUTPUTS)
            raise InvalidArgument(
                f"outputs[{i}].name: unknown output {short(o.name)} (outputs of an inversion: {known})"
            )
        if o.name in seen:
            raise InvalidArgument(f"outputs[{i}].name: output {o.name!r} requested twice")
        seen.add(o.name)
        fixed = INVERSION_OUTPUTS[o.name]
        if fixed is None:  # images: FP32 or UINT8, the request's datatype unless its own says
            given = o.datatype if o.datatype is not None else datatype
            if given not in OUTPUT_DATATYPES:
                known = ", ".join(OUTPUT_DATATYPES)
                raise InvalidArgument(f"outputs[{i}].parameters.datatype: {short(given)} is not one of {known}")
            want.append(Requested(o.name, given))
        else:
            if o.datatype is not None and o.datatype != fixed:
                raise InvalidArgument(
                    f"outputs[{i}].parameters.datatype: output {o.name!r} is {fixed} (got {short(o.datatype)})"
                )
            want.append(Requested(o.name, fixed))
    return tuple(want)


def _check_inversion(info: dm.ModelInfo, req: Request) -> None:
    """The images tensor's shape and the outputs listed, against the version that inverts them, before any work."""
    c, h, w = info.spec.output_shape
    t = req.images
    if t is not None and tuple(t.shape[1:]) != (h, w, c):
        raise InvalidArgument(
            f"{t.field}.shape: model {info.name!r} draws {h}×{w}×{c} images: input 'images' is [n, {h}, {w}, {c}]"
            f" (got {list(t.shape)})"
        )  # fmt: skip
    if not info.spec.num_classes:
        for i, r in enumerate(req.want):
            if r.name in CONDITIONAL_OUTPUTS:
                raise InvalidArgument(f"outputs[{i}].name: model {info.name!r} is unconditional: it has no {r.name}")


def _inputs_by_name(inputs: Sequence[Tensor]) -> dict[str, Tensor]:
    by_name: dict[str, Tensor] = {}
    for t in inputs:
        if t.name not in ("z", "y", "images"):
            raise InvalidArgument(
                f"{t.field}.name: unknown input {short(t.name)} (inputs: z, y) to generate, or images to invert"
            )
        if t.name in by_name:
            raise InvalidArgument(f"{t.field}.name: input {t.name!r} given twice")
        if t.name == "images":
            if t.datatype != "UINT8":
                raise InvalidArgument(
                    f"{t.field}.datatype: input 'images' is UINT8 only, pixels [n, H, W, C] (got {short(t.datatype)})"
                )
        elif t.datatype != "FP32":
            raise InvalidArgument(f"{t.field}.datatype: input {t.name!r} is FP32 (got {short(t.datatype)})")
        by_name[t.name] = t
    return by_name


def _array(t: Tensor) -> np.ndarray:
    """The tensor's values in its own shape: the shape it declares must hold exactly the values it carries."""
    rank, form = (4, "UINT8 [n, H, W, C] with n >= 1") if t.name == "images" else (2, "[n, width]")
    if len(t.shape) != rank or not all(0 <= d < 2**31 for d in t.shape) or (rank == 4 and not t.shape[0]):
        raise InvalidArgument(f"{t.field}.shape: input {t.name!r} is {form} (got {list(t.shape)})")
    n = math.prod(t.shape)
    got = 0 if t.data is None else t.data.size
    if got != n:
        raise InvalidArgument(f"{t.field}: shape {list(t.shape)} holds {n} values, the tensor has {got}")
    return t.data.reshape(t.shape)


def _seeds(parameters: Mapping[str, Parameter]) -> dm.Seeds | dm.SeedRange:
    if "seeds" in parameters:
        if "seed_start" in parameters or "count" in parameters:
            raise InvalidArgument("parameters.seeds: give seeds, or seed_start and count, not both")
        return text.seeds(parameters["seeds"], "parameters.seeds")
    if "seed_start" in parameters or "count" in parameters:
        start = _integer(parameters.get("seed_start", 0), "parameters.seed_start")
        return dm.SeedRange(start, _integer(parameters.get("count", 1), "parameters.count"))
    raise InvalidArgument("inputs: give a z tensor, or seeds as parameters (seeds, or seed_start and count)")


def _timeout(value: Parameter | None) -> float | None:
    """The `timeout` parameter, in microseconds as Triton reads it; 0 or absent: none of its own."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidArgument(f"parameters.timeout: microseconds, an integer >= 0 (got {short(str(value))})")
    return value / 1e6 if value else None


def _priority(value: Parameter) -> bool:
    if isinstance(value, bool) or value not in PRIORITIES:
        raise InvalidArgument(
            f"parameters.priority: 1 (high) or 2 (normal; 0 is the default, normal) (got {short(str(value))})"
        )
    return PRIORITIES[value]


def _integer(value: Parameter, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{field}: an integer (got {type(value).__name__})")
    return value


def _number(value: Parameter, field: str) -> float:
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer past float's range
        number = math.nan
    if not math.isfinite(number):
        raise InvalidArgument(f"{field}: a number (got {short(str(value))})")
    return number


def _requested(outputs: Sequence[Requested], datatype: str) -> Requested:
    """The output asked for; its datatype from its own parameter, else the request's, else FP32."""
    if not outputs:
        outputs = [Requested(OUTPUT, datatype)]
    if len(outputs) > 1:
        raise InvalidArgument(f"outputs: the model has one output, {OUTPUT!r}; {len(outputs)} requested")
    want = outputs[0]
    if want.datatype is None:
        want = Requested(want.name, datatype)
    if want.name != OUTPUT:
        raise InvalidArgument(f"outputs[0].name: unknown output {short(want.name)} (outputs: {OUTPUT})")
    if want.datatype not in OUTPUT_DATATYPES:
        known = ", ".join(OUTPUT_DATATYPES)
        raise InvalidArgument(f"outputs[0].parameters.datatype: {short(want.datatype)} is not one of {known}")
    return want
