"""The Open Inference Protocol (KServe v2): its tensors and parameters → one domain request, and back.

Both OIP front ends share this module: the gRPC servicer below and the REST routes in service/http.py. They differ
only in how tensors travel (protobuf contents or raw bytes; JSON or the binary extension); what a tensor means is
decided here once. A generator is described as tensors: inputs `z` FP32 [-1, latent_dim] and, for conditional
models, `y` FP32 [-1, classes]; one output, `images` FP32 [-1, C, H, W] in the model's range (UINT8 [-1, H, W, C]
through the output parameter `datatype`), or `points` FP32 [-1, 2] for the 2-D generators. Instead of tensors, a
request may give seeds as parameters; they follow the seed contract of ganserve.v1, so the same seeds give the
same bytes through either API.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as package_metadata

import numpy as np

from service import domain as dm
from service.api.inference import grpc_predict_v2_pb2 as pb
from service.api.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.dataplane import DataPlane
from service.errors import InvalidArgument, ServiceError, renamed, short
from service.servicer import deadline_of

SERVER_NAME = "gan-serve"
EXTENSIONS = ["binary_tensor_data"]  # the REST binary extension, as Triton names it
PLATFORM = "onnxruntime_onnx"
# "datatype" asks for UINT8 images for the whole request, for clients that cannot set output parameters.
SEED_PARAMETERS = ("seeds", "seed_start", "count", "labels", "truncation", "datatype")
# Standard parameters that change nothing here; anything else unknown is refused, so a typo never passes silently.
IGNORED_PARAMETERS = ("binary_data_output", "priority", "timeout")
OUTPUT_DATATYPES = {"FP32": "float32", "UINT8": "uint8"}
GRPC_FIELDS = ("model_name", "model_version")  # how errors name the model and version of a ModelInfer
MAX_SEED_TEXT = 1 << 16  # seeds one `seeds` text may list; a single range a-b is never expanded
SEED_ITEM = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")

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
    """The output the client asked for: the model's output name, in FP32 or UINT8 (None: as the request says)."""

    name: str
    datatype: str | None = None


@dataclass(frozen=True)
class Outcome:
    """One output tensor of a ModelInfer answer, its values as one row-major little-endian blob."""

    name: str
    datatype: str
    shape: list[int]
    blob: bytes
    model: str
    version: int


def parse_version(text: str, field: str) -> int:
    """ "" → 0 (the latest ready version); otherwise a positive decimal number."""
    if text == "":
        return 0
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise InvalidArgument(f"{field}: {short(text)} is not a version number")
    return int(text)


def output_name(info: dm.ModelInfo) -> str:
    return "points" if info.spec.kind == "points" else "images"


def model_metadata(info: dm.ModelInfo) -> dict:
    """ModelMetadataResponse as the REST JSON; the gRPC servicer converts the same dict."""
    spec = info.spec
    inputs = [{"name": "z", "datatype": "FP32", "shape": [-1, spec.latent_dim]}]
    if spec.num_classes:
        inputs.append({"name": "y", "datatype": "FP32", "shape": [-1, spec.num_classes]})
    output = {"name": output_name(info), "datatype": "FP32", "shape": [-1, *spec.output_shape]}
    parameters: dict[str, Parameter] = {
        "latent_dim": spec.latent_dim, "prior": spec.prior, "class_names": ",".join(spec.class_names),
        "kind": spec.kind, "version": info.version, "provider": info.provider,
    }  # fmt: skip
    if spec.output_range is not None:
        parameters |= {"output_min": spec.output_range[0], "output_max": spec.output_range[1]}
        parameters["output_datatypes"] = ",".join(OUTPUT_DATATYPES)
    parameters |= {k: v for k, v in info.metadata.items() if k not in parameters}
    return {
        "name": info.name, "versions": [str(v) for v in info.versions], "platform": PLATFORM,
        "inputs": inputs, "outputs": [output], "parameters": parameters,
    }  # fmt: skip


def to_generate(
    info: dm.ModelInfo, parameters: Mapping[str, Parameter], inputs: Sequence[Tensor], outputs: Sequence[Requested]
) -> tuple[dm.Generate, Requested]:
    """One ModelInfer request → the domain request, and the output it asked for.

    `info` is the version the request named: tensor shapes are checked against it here, so that errors name the
    tensor rather than the data plane's fields. Counts, seeds, labels and ψ are checked by the data plane.
    """
    for key in parameters:
        if key not in SEED_PARAMETERS and key not in IGNORED_PARAMETERS:
            known = ", ".join(SEED_PARAMETERS)
            raise InvalidArgument(f"parameters: unknown parameter {short(key, 32)} (parameters: {known})")
    spec = info.spec
    by_name = _inputs_by_name(inputs, spec.num_classes)
    seeded = [key for key in ("seeds", "seed_start", "count") if key in parameters]
    labels = _labels(parameters["labels"]) if "labels" in parameters else ()
    if "z" in by_name:
        if seeded:
            raise InvalidArgument(f"parameters.{seeded[0]}: give seeds or a z tensor, not both")
        z = _matrix(by_name["z"], spec.latent_dim)
        latents: dm.Seeds | dm.SeedRange | dm.Rows = dm.Rows(z.ravel())
        n = len(z)
    else:
        latents = _seeds(parameters)
        n = latents.count if isinstance(latents, dm.SeedRange) else len(latents.values)
    if "y" in by_name:
        if labels:
            raise InvalidArgument("parameters.labels: give labels or a y tensor, not both")
        y = _matrix(by_name["y"], spec.num_classes)
        if len(y) not in (1, n):
            raise InvalidArgument(f"{by_name['y'].field}.shape: {len(y)} rows for {n} samples; give 1 or {n}")
        labels = [dm.Label(soft=tuple(row)) for row in y.tolist()]
    psi = _number(parameters.get("truncation", 0.0), "parameters.truncation")
    want = _requested(info, outputs, str(parameters.get("datatype", "FP32")))
    output = dm.Output(format=OUTPUT_DATATYPES[want.datatype])
    return dm.Generate(info.name, info.version, latents, labels, psi, output), want


def outcome(result: dm.Result, want: Requested) -> Outcome:
    blob = b"".join(result.images)
    return Outcome(want.name, want.datatype, [len(result.images), *result.image_shape], blob, result.model,
                   result.version)  # fmt: skip


async def infer(
    plane: DataPlane, model: str, version: str, parameters: Mapping[str, Parameter], inputs: Sequence[Tensor],
    outputs: Sequence[Requested], deadline: float | None = None, fields: tuple[str, str] = GRPC_FIELDS,
) -> Outcome:  # fmt: skip
    """Run one ModelInfer through the data plane (and its batcher, limits and metrics)."""
    info = plane.get_model(model, parse_version(version, fields[1]), *fields)
    request, want = to_generate(info, parameters, inputs, outputs)
    try:
        result = await plane.generate(request, deadline)
    except ServiceError as e:
        raise renamed(e, _wire_names(inputs, parameters, fields)) from None
    return outcome(result, want)


def _wire_names(inputs: Sequence[Tensor], parameters: Mapping[str, Parameter], fields: tuple[str, str]) -> dict:
    """The data plane's fields → the fields of this request that carried them."""
    tensors = {t.name: t.field for t in inputs}
    seeds = "parameters.seeds" if "seeds" in parameters else None
    return {
        "model": fields[0], "version": fields[1], "latents": "inputs", "rows.values": tensors.get("z", "inputs"),
        "seeds.seeds": "parameters.seeds", "seed_range.start": seeds or "parameters.seed_start",
        "seed_range.count": seeds or "parameters.count", "labels": tensors.get("y", "parameters.labels"),
        "truncation": "parameters.truncation", "output": "outputs",
    }  # fmt: skip


def _inputs_by_name(inputs: Sequence[Tensor], num_classes: int) -> dict[str, Tensor]:
    known = ("z", "y") if num_classes else ("z",)
    by_name: dict[str, Tensor] = {}
    for t in inputs:
        if t.name not in known:
            raise InvalidArgument(f"{t.field}.name: unknown input {short(t.name)} (inputs: {', '.join(known)})")
        if t.name in by_name:
            raise InvalidArgument(f"{t.field}.name: input {t.name!r} given twice")
        if t.datatype != "FP32":
            raise InvalidArgument(f"{t.field}.datatype: input {t.name!r} is FP32 (got {short(t.datatype)})")
        by_name[t.name] = t
    if "y" in by_name and "z" not in by_name:
        raise InvalidArgument("inputs: y needs z; or give seeds and labels as parameters")
    return by_name


def _matrix(t: Tensor, width: int) -> np.ndarray:
    """A [n, width] FP32 tensor, its shape checked against its values."""
    if len(t.shape) != 2 or t.shape[1] != width or t.shape[0] < 1:
        raise InvalidArgument(f"{t.field}.shape: input {t.name!r} is [n, {width}] (got {list(t.shape)})")
    n = t.shape[0] * width
    if t.data is None or t.data.size != n:
        got = 0 if t.data is None else t.data.size
        raise InvalidArgument(f"{t.field}: shape {list(t.shape)} holds {n} values, the tensor has {got}")
    return t.data.reshape(t.shape)


def _seeds(parameters: Mapping[str, Parameter]) -> dm.Seeds | dm.SeedRange:
    if "seeds" in parameters:
        if "seed_start" in parameters or "count" in parameters:
            raise InvalidArgument("parameters.seeds: give seeds, or seed_start and count, not both")
        return seed_text(parameters["seeds"], "parameters.seeds")
    if "seed_start" in parameters or "count" in parameters:
        start = _integer(parameters.get("seed_start", 0), "parameters.seed_start")
        return dm.SeedRange(start, _integer(parameters.get("count", 1), "parameters.count"))
    raise InvalidArgument("inputs: give a z tensor, or seeds as parameters (seeds, or seed_start and count)")


def seed_text(value: Parameter, field: str) -> dm.Seeds | dm.SeedRange:
    """Seeds as people write them: 7, "0-15", "1,5,9" or "0-3,10" (ranges inclusive)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return dm.Seeds([value])
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}: seeds as text, such as '0-15' or '1,5,9' (got {type(value).__name__})")
    items = [SEED_ITEM.fullmatch(item) for item in value.split(",")]
    if not all(items):
        raise InvalidArgument(f"{field}: {short(value)} is not seeds, such as '0-15' or '1,5,9'")
    if len(items) == 1 and items[0][2] is not None:  # one range: never expanded, the data plane checks its count
        start, stop = int(items[0][1]), int(items[0][2])
        return dm.SeedRange(start, stop - start + 1 if stop >= start else 0)
    seeds: list[int] = []
    for item in items:
        start = int(item[1])
        stop = start if item[2] is None else int(item[2])
        if stop - start + 1 + len(seeds) > MAX_SEED_TEXT:
            raise InvalidArgument(f"{field}: more than {MAX_SEED_TEXT:,} seeds")
        seeds.extend(range(start, stop + 1))
    return dm.Seeds(seeds)


def _labels(value: Parameter) -> list[dm.Label]:
    """Labels as a class index, a name, or a comma-separated list of them (one per sample)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [dm.Label(index=value)]
    if not isinstance(value, str) or not value:
        raise InvalidArgument("parameters.labels: class indices or names, such as '7' or '3,5,7'")
    return [label_text(item.strip()) for item in value.split(",")]


def label_text(text: str) -> dm.Label:
    """ "7" → class 7, anything else → the class of that name."""
    return dm.Label(index=int(text)) if text.isascii() and text.isdigit() else dm.Label(name=text)


def _integer(value: Parameter, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{field}: an integer (got {type(value).__name__})")
    return value


def _number(value: Parameter, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{field}: a number (got {short(str(value))})")
    return float(value)


def _requested(info: dm.ModelInfo, outputs: Sequence[Requested], datatype: str) -> Requested:
    """The output asked for; its datatype from its own parameter, else the request's, else FP32."""
    name = output_name(info)
    if not outputs:
        outputs = [Requested(name, datatype)]
    if len(outputs) > 1:
        raise InvalidArgument(f"outputs: the model has one output, {name!r}; {len(outputs)} requested")
    want = outputs[0]
    if want.datatype is None:
        want = Requested(want.name, datatype)
    if want.name != name:
        raise InvalidArgument(f"outputs[0].name: unknown output {short(want.name)} (outputs: {name})")
    kinds = ("FP32",) if info.spec.kind == "points" else tuple(OUTPUT_DATATYPES)
    if want.datatype not in kinds:
        raise InvalidArgument(
            f"outputs[0].parameters.datatype: {short(want.datatype)} is not one of {', '.join(kinds)}"
        )
    return want


# ---- gRPC ---------------------------------------------------------------------------------------------------------


def from_parameter(p: pb.InferParameter) -> Parameter:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else ""


def to_parameter(value: Parameter) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value) if value < 2**63 else pb.InferParameter(uint64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def _grpc_inputs(request: pb.ModelInferRequest) -> list[Tensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents: {len(raw)} blobs for {len(request.inputs)} inputs")
    tensors = []
    for i, t in enumerate(request.inputs):
        field = f"inputs[{i}]"
        if raw:
            if t.HasField("contents"):
                raise InvalidArgument(f"{field}.contents: give values in contents or raw_input_contents, not both")
            if len(raw[i]) % 4:
                raise InvalidArgument(f"raw_input_contents[{i}]: {len(raw[i])} bytes is not whole FP32 values")
            data = np.frombuffer(raw[i], "<f4")
        else:
            data = np.asarray(t.contents.fp32_contents, np.float32)
        tensors.append(Tensor(t.name, t.datatype, tuple(t.shape), data, field))
    return tensors


def _grpc_outputs(request: pb.ModelInferRequest) -> list[Requested]:
    outputs = []
    for o in request.outputs:
        datatype = str(from_parameter(o.parameters["datatype"])) if "datatype" in o.parameters else None
        outputs.append(Requested(o.name, datatype))
    return outputs


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the shared data plane."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.registry.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.plane.is_ready(request.name, parse_version(request.version, "version")))

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        info = self.plane.get_model(request.name, parse_version(request.version, "version"))
        meta = model_metadata(info)
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensors(**t) for t in meta["inputs"]], outputs=[tensors(**t) for t in meta["outputs"]],
            parameters={k: to_parameter(v) for k, v in meta["parameters"].items()},
        )  # fmt: skip

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        parameters = {k: from_parameter(v) for k, v in request.parameters.items()}
        out = await infer(
            self.plane, request.model_name, request.model_version, parameters, _grpc_inputs(request),
            _grpc_outputs(request), deadline_of(context),
        )  # fmt: skip
        tensor = pb.ModelInferResponse.InferOutputTensor(name=out.name, datatype=out.datatype, shape=out.shape)
        return pb.ModelInferResponse(
            model_name=out.model, model_version=str(out.version), id=request.id, outputs=[tensor],
            raw_output_contents=[out.blob],
        )  # fmt: skip
