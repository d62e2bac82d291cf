"""The Open Inference Protocol (KServe v2): what its tensors and parameters mean, once for both of its wires.

The gRPC servicer (oip_grpc) and the REST routes (oip_rest) differ only in how tensors travel (protobuf contents or
raw bytes; JSON or the binary extension); each turns its request into Tensors and parameters, and this module
turns those into one domain request. A generator is described as tensors: inputs `z` FP32 [-1, latent_dim] and, for
conditional models, `y` FP32 [-1, classes], passed to the model as given; one output, `images` FP32 [-1, C, H, W]
in the model's range (UINT8 [-1, H, W, C] through the output parameter `datatype`). Instead of tensors, a request
may give seeds and labels as parameters; they follow the seed contract of ganserve.v1, so the same seeds give the
same bytes through either API. The standard `timeout` parameter (microseconds, as Triton reads it) is the call's
deadline, and `priority` has two levels, as Triton numbers them with two: 1 goes ahead of every request at 2, the
default level (0 means the default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as package_metadata

import numpy as np

from service import domain as dm
from service import gate
from service.errors import InvalidArgument, short
from service.frontends import text

SERVER_NAME = "gan-serve"
EXTENSIONS = ["binary_tensor_data"]  # the REST binary extension, as Triton names it
PLATFORM = "onnxruntime_onnx"
OUTPUT = "images"
# "datatype" asks for UINT8 images for the whole request, for clients that cannot set output parameters.
SEED_PARAMETERS = (
    "seeds", "seed_start", "count", "labels", "truncation", "datatype", "timeout", "priority", "direction", "strengths",
)  # fmt: skip
# Standard parameters that change nothing here; anything else unknown is refused, so a typo never passes silently.
IGNORED_PARAMETERS = ("binary_data_output",)
PRIORITIES = {0: False, 1: True, 2: False}  # the `priority` parameter → urgent
OUTPUT_DATATYPES = {"FP32": dm.Format.FLOAT32, "UINT8": dm.Format.UINT8}
GRPC_FIELDS = ("model_name", "model_version")  # how errors name the model and version of a ModelInfer

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
    """The output the client asked for, in FP32 or UINT8 (None: as the request says)."""

    name: str
    datatype: str | None = None


@dataclass(frozen=True)
class Request:
    """One ModelInfer as the data plane takes it, the output it asked for, and its own timeout in seconds."""

    domain: dm.Generate | dm.Infer | dm.Edit
    want: Requested
    timeout: float | None


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
    the data plane; seeds and labels as parameters follow the seed contract. Errors name this request's fields."""
    for key in parameters:
        if key not in SEED_PARAMETERS and key not in IGNORED_PARAMETERS:
            known = ", ".join(SEED_PARAMETERS)
            raise InvalidArgument(f"parameters: unknown parameter {short(key, 32)} (parameters: {known})")
    by_name = _inputs_by_name(inputs)
    number = text.version(version, fields[1])
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
        if "labels" not in parameters and "direction" not in parameters:
            y = _array(by_name["y"]) if "y" in by_name else None
            names.setdefault("y", "inputs")
            return Request(dm.Infer(model, number, z, y, psi, output, dm.Names(names), urgent), want, timeout)
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
        return Request(edit, want, timeout)
    generate = dm.Generate(model, number, latents, labels, psi, output, dm.Names(names), urgent)
    return Request(generate, want, timeout)


def deadline(req: Request) -> float | None:
    """The call's deadline, its own `timeout` (if any) applied first: both wires enforce it alike."""
    call = gate.current()
    if req.timeout is not None:
        call.limit(req.timeout, f"parameters.timeout ({req.timeout:g} s)")
    return call.deadline


def outcome(result: dm.Result, want: Requested) -> tuple[str, list[int], np.ndarray]:
    """The answer's one output tensor: its datatype, its shape, and its values."""
    return want.datatype, [len(result.pixels), *result.image_shape], result.pixels


def _inputs_by_name(inputs: Sequence[Tensor]) -> dict[str, Tensor]:
    by_name: dict[str, Tensor] = {}
    for t in inputs:
        if t.name not in ("z", "y"):
            raise InvalidArgument(f"{t.field}.name: unknown input {short(t.name)} (inputs: z, y)")
        if t.name in by_name:
            raise InvalidArgument(f"{t.field}.name: input {t.name!r} given twice")
        if t.datatype != "FP32":
            raise InvalidArgument(f"{t.field}.datatype: input {t.name!r} is FP32 (got {short(t.datatype)})")
        by_name[t.name] = t
    return by_name


def _array(t: Tensor) -> np.ndarray:
    """The tensor's values in its own shape: the shape it declares must hold exactly the values it carries."""
    if len(t.shape) != 2 or not all(0 <= d < 2**31 for d in t.shape):
        raise InvalidArgument(f"{t.field}.shape: input {t.name!r} is [n, width] (got {list(t.shape)})")
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
