"""The Open Inference Protocol over gRPC (inference.GRPCInferenceService): protobuf tensors and parameters →
service/frontends/oip.py's meaning → the data plane → protobuf."""

from __future__ import annotations

import numpy as np

from service import domain as dm
from service.api.inference import grpc_predict_v2_pb2 as pb
from service.api.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.dataplane import DataPlane
from service.errors import InvalidArgument
from service.frontends import oip, text
from service.frontends.oip import Parameter

NAMES = dm.Names({"model": "name"})


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


def _inputs(request: pb.ModelInferRequest) -> list[oip.Tensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents: {len(raw)} blobs for {len(request.inputs)} inputs")
    tensors = []
    for i, t in enumerate(request.inputs):
        field = f"inputs[{i}]"
        uint8 = t.name == "images" and t.datatype == "UINT8"  # an inversion's pixels; any other input is FP32
        if raw:
            if t.HasField("contents"):
                raise InvalidArgument(f"{field}.contents: give values in contents or raw_input_contents, not both")
            if uint8:
                data = np.frombuffer(raw[i], np.uint8)
            elif len(raw[i]) % 4:
                raise InvalidArgument(f"raw_input_contents[{i}]: {len(raw[i])} bytes is not whole FP32 values")
            else:
                data = np.frombuffer(raw[i], "<f4")
        elif uint8:
            data = _uint8(t.contents.uint_contents, f"{field}.contents.uint_contents")
        else:
            data = np.asarray(t.contents.fp32_contents, np.float32)
        tensors.append(oip.Tensor(t.name, t.datatype, tuple(t.shape), data, field))
    return tensors


def _uint8(values, field: str) -> np.ndarray:
    """UINT8 values as protobuf carries them, in uint_contents (uint32 each): each must fit a byte."""
    data = np.asarray(values, np.uint32)
    if data.size and data.max() > 255:
        raise InvalidArgument(f"{field}: UINT8 values are 0 to 255 (got {int(data.max())})")
    return data.astype(np.uint8)


def _outputs(request: pb.ModelInferRequest) -> list[oip.Requested]:
    outputs = []
    for o in request.outputs:
        datatype = str(from_parameter(o.parameters["datatype"])) if "datatype" in o.parameters else None
        outputs.append(oip.Requested(o.name, datatype))
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
        return pb.ModelReadyResponse(ready=self.plane.is_ready(request.name, text.version(request.version, "version")))

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=oip.SERVER_NAME, version=oip.server_version(), extensions=oip.EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        info = self.plane.get_model(request.name, text.version(request.version, "version"), NAMES)
        meta = oip.model_metadata(info)
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensors(**t) for t in meta["inputs"]], outputs=[tensors(**t) for t in meta["outputs"]],
            parameters={k: to_parameter(v) for k, v in meta["parameters"].items()},
        )  # fmt: skip

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        parameters = {k: from_parameter(v) for k, v in request.parameters.items()}
        req = oip.request(
            request.model_name, request.model_version, parameters, _inputs(request), _outputs(request)
        )  # fmt: skip
        answer = await oip.answer(self.plane, req)
        tensors = [pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                   for t in answer.outputs]  # fmt: skip
        return pb.ModelInferResponse(
            model_name=answer.model, model_version=str(answer.version), id=request.id, outputs=tensors,
            raw_output_contents=[t.values.tobytes() for t in answer.outputs],
            parameters={k: to_parameter(v) for k, v in answer.parameters.items()},
        )  # fmt: skip
