"""Fuzz cases for every RPC of every registered service, and the verdict on each answer.

Typed requests, raw bytes and header garbage as Hypothesis strategies; `verdict` says what is wrong with an
answer. Whatever arrives, the answer is a documented status: OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED or
FAILED_PRECONDITION; UNIMPLEMENTED only for a method the server does not have, DEADLINE_EXCEEDED only for a call
that set a deadline; never INTERNAL or UNKNOWN. A refusal of a ganserve.v1 request names the field it is about and
no message carries a traceback. Shared by tests/test_fuzz.py (a few hundred cases in-process) and bench/fuzz.py
(tens of thousands against a server process).
"""

from __future__ import annotations

import math
import re
import string
import struct
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import descriptor, message, message_factory, text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import strategies as st

from service import encode
from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.api.inference import grpc_predict_v2_pb2 as oip
from testkit.servefix import echo_encoder, echo_model, plain_model

# ---- what the server may answer -----------------------------------------------------------------------------

Code = grpc.StatusCode
DOCUMENTED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION}
AUTH = {Code.UNAUTHENTICATED, Code.PERMISSION_DENIED}  # only from a server with tokens on
NAMING = {Code.INVALID_ARGUMENT, Code.NOT_FOUND}  # the refusals of a request, which must say which field is wrong
TRACEBACK = ("Traceback", 'File "')
MAX_DETAILS = 1024  # client-supplied text in a message is quoted and cut (service/errors.py, short)
SAFETY_S = 60.0  # a call without a deadline of its own that runs this long has hung
FIELD_PATH = re.compile(r"[a-z_][a-z0-9_]*(\[\d+\])?(\.[a-z_][a-z0-9_]*(\[\d+\])?)*")
ENDLESS = {"/grpc.health.v1.Health/Watch"}  # streams until the client leaves: the first answer is the outcome
# Registered from the health proto, not implemented by grpcio-health-checking's servicer: past parsing, its
# generated base class answers UNIMPLEMENTED.
UPSTREAM_GAPS = {"/grpc.health.v1.Health/List"}

SERVICES = [
    *pb.DESCRIPTOR.services_by_name.values(),
    oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
]
METHODS = [(f"/{s.full_name}/{m.name}", m) for s in SERVICES for m in s.methods]
OURS = {pb.DESCRIPTOR.package, oip.DESCRIPTOR.package}  # the APIs whose refusals must name a field
GANSERVE = [(path, m) for path, m in METHODS if m.containing_service.file.package in OURS]


def request_class(method: descriptor.MethodDescriptor) -> type[message.Message]:
    return message_factory.GetMessageClass(method.input_type)


@dataclass(frozen=True)
class Case:
    """One call: a method (None: one the API does not have), the body as sent, headers, an optional deadline."""

    kind: str  # typed, raw or metadata
    path: str
    method: descriptor.MethodDescriptor | None
    body: bytes
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    timeout: float | None = None
    request: message.Message | None = None  # typed cases: what `body` encodes

    def __repr__(self) -> str:
        shown = text_format.MessageToString(self.request, as_one_line=True) if self.request is not None else self.body
        shown = repr(shown)
        headers = [(k, (v[:40] + f"...({len(v)})") if len(v) > 40 else v) for k, v in self.metadata]
        return (
            f"Case({self.kind} {self.path} {shown[:600]}{'...' if len(shown) > 600 else ''}"
            f"{f' metadata={headers}' if headers else ''}{f' timeout={self.timeout}' if self.timeout else ''})"
        )

    def parses(self) -> bool:
        try:
            request_class(self.method).FromString(self.body)
        except message.DecodeError:
            return False
        return True


def names_a_field(details: str, request: descriptor.Descriptor) -> bool:
    """Whether the message starts with `<field path>:`, a path through the request type, or `request:`."""
    head = details.split(":", 1)[0] if ":" in details else ""
    if head == "request":
        return True
    if not FIELD_PATH.fullmatch(head):
        return False
    where: descriptor.Descriptor | None = request
    key = False  # the next part is a map's key, not a field
    for part in head.split("."):
        name = part.split("[", 1)[0]
        if key:
            where, key = where.fields_by_name["value"].message_type, False
            continue
        if where is None:  # past a scalar or a oneof
            return False
        if name in where.oneofs_by_name:
            where = None
            continue
        field = where.fields_by_name.get(name)
        if field is None:
            return False
        where = field.message_type
        key = where is not None and where.GetOptions().map_entry
    return True


def verdict(case: Case, code: Code, details: str, served: set[str], auth: bool = False) -> str | None:
    """What is wrong with this answer to `case`; None when nothing is."""
    if any(t in details for t in TRACEBACK):
        return "traceback text in the message"
    if len(details) > MAX_DETAILS:
        return f"a message over {MAX_DETAILS} characters"
    if auth and code in AUTH:
        return None if details.startswith("authorization:") else f"{code.name} without 'authorization:'"
    if code is Code.DEADLINE_EXCEEDED:
        return None if case.timeout is not None else "DEADLINE_EXCEEDED without a deadline: the call hung"
    if code is Code.UNIMPLEMENTED and case.path in UPSTREAM_GAPS:
        return None
    if case.method is None or case.method.containing_service.full_name not in served:
        return None if code is Code.UNIMPLEMENTED else f"{code.name} for a method the server does not have"
    if not case.parses():
        if code is Code.INVALID_ARGUMENT and details.startswith("request:"):
            return None
        return f"{code.name} for a body that does not parse (expected INVALID_ARGUMENT 'request: ...')"
    if code not in DOCUMENTED:
        return f"undocumented status {code.name}"
    if code is not Code.OK and not details and case.method.containing_service.file.package in OURS:
        return f"{code.name} with an empty message"
    if (
        code in NAMING
        and case.method.containing_service.file.package in OURS
        and not names_a_field(details, case.method.input_type)
    ):
        return "the message does not start with a field of the request"
    return None


def call(channel: grpc.Channel, case: Case) -> tuple[Code, str]:
    """Send `case` over a sync channel, the body as it is; the status code and message."""
    timeout = case.timeout or SAFETY_S
    md = list(case.metadata)
    streaming = case.method is not None and case.method.server_streaming
    try:
        if case.method is not None and case.method.client_streaming:
            for _ in channel.stream_stream(case.path)(iter([case.body]), metadata=md, timeout=timeout):
                pass
        elif streaming:
            responses = channel.unary_stream(case.path)(case.body, metadata=md, timeout=timeout)
            for _ in responses:
                if case.path in ENDLESS:
                    responses.cancel()
                    break
        else:
            channel.unary_unary(case.path)(case.body, metadata=md, timeout=timeout)
    except grpc.RpcError as e:
        if e.code() is Code.CANCELLED and case.path in ENDLESS:
            return Code.OK, ""
        return e.code(), e.details() or ""
    return Code.OK, ""


# ---- typed requests -----------------------------------------------------------------------------------------

SERVED_MODELS = ("echo", "plain", "mnist-cdcgan")  # never unloaded by the fuzz; health depends on them
SPARE = "spare"  # a model the fuzz may unload and load again
CLASS_NAMES = ("cat", "dog", "eel", *map(str, range(10)))
LATENT_DIMS = (5, 8, 100)
COUNTS = (0, 1, 2, 3, 63, 64, 65, 255, 256, 257, 1024, 1025, 65536, 65537)

U64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**32, 2**63, 2**64 - 2, 2**64 - 1]))
U32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([*COUNTS, 2**31, 2**32 - 1]))
I32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 0, 1, 2, 3, 4, 99]))
F32 = st.floats(width=32)  # NaN, ±Inf, subnormals included
FINITE = st.floats(-4, 4, width=32)


def weighted(*options: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, picked in proportion to its weight."""
    return st.sampled_from([s for weight, s in options for _ in range(weight)]).flatmap(lambda s: s)


VERSIONS = weighted((6, st.just(0)), (1, st.sampled_from([1, 2, 3])), (1, U32))
WEIRD = st.sampled_from([
    "", " ", ".", "..", "../plain", "/", "plain/1", "plain/../echo", "~", "*", "%s", "\x00", "plain\x00", "PLAIN",
    " plain", "ech\u200bo", "\u202eohce", "🦄", "e\u0301cho", "\ufeffplain", "\U0010ffff", "CON", "model.onnx",
])  # fmt: skip
NAMES = st.one_of(
    st.sampled_from([*SERVED_MODELS, SPARE]),
    WEIRD,
    st.text(max_size=24),
    st.builds(lambda s, k: s * k, st.text(min_size=1, max_size=8), st.sampled_from([100, 2000])),
)
DEADLINES = weighted((7, st.none()), (1, st.sampled_from([0.002, 0.05])))


@st.composite
def latent_values(draw, rows: st.SearchStrategy[int]) -> list[float]:
    """Rows of a latent dim the fuzzed models have, give or take a value, sometimes with NaN or Inf."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.lists(F32, max_size=20))
    d, n = draw(st.sampled_from(LATENT_DIMS)), draw(rows)
    base = draw(st.lists(FINITE, min_size=1, max_size=6))
    size = max(0, n * d + draw(st.sampled_from([0, 0, 0, 1, -1])))
    values = (base * (size // len(base) + 1))[:size]
    if values and draw(st.booleans()):
        values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return values


# Each field is mostly valid, so that a request often gets past validation to batching and encoding.
LABEL_KINDS = {
    "index": weighted((4, st.integers(0, 2)), (1, st.integers(3, 10)), (1, U32)),
    "name": weighted((4, st.sampled_from(CLASS_NAMES)), (1, NAMES)),
    "soft": weighted(
        (3, st.sampled_from([3, 10]).flatmap(lambda n: st.lists(st.floats(0, 10, width=32), min_size=n, max_size=n))),
        (1, st.lists(F32, max_size=12)),
    ),
    "none": st.none(),
}
KIND_WEIGHTS = {"index": 3, "name": 3, "soft": 2, "none": 1}


@st.composite
def labels(draw) -> pb.Label:
    kind = draw(weighted(*((w, st.just(k)) for k, w in KIND_WEIGHTS.items())))
    value = draw(LABEL_KINDS[kind])
    label = pb.Label()
    if kind == "soft":
        label.soft.SetInParent()
        label.soft.weights.extend(value)
    elif kind != "none":
        setattr(label, kind, value)
    return label


def repeated(item: st.SearchStrategy, small: int, times: tuple[int, ...]) -> st.SearchStrategy[list]:
    """A short list, or a short list repeated up to thousands of items: oversized but quick to draw."""
    return st.one_of(
        st.lists(item, max_size=small),
        st.builds(lambda xs, k: xs * k, st.lists(item, min_size=1, max_size=3), st.sampled_from(times)),
    )


LABEL_LISTS = weighted(
    (3, st.just([])), (3, st.lists(labels(), min_size=1, max_size=1)), (2, repeated(labels(), 3, (2, 22, 100, 700)))
)
OUTPUTS = st.builds(
    pb.OutputOptions,
    format=weighted((5, st.sampled_from([0, 1, 2, 3])), (1, I32)),
    grid=weighted((3, st.just(False)), (1, st.just(True))),
    grid_columns=weighted((4, st.sampled_from([0, 1, 3])), (1, U32)),
    return_latents=st.booleans(),
    grid_only=weighted((5, st.just(False)), (1, st.just(True))),
)
TRUNCATIONS = weighted(
    (4, st.just(0.0)),
    (2, st.floats(0.125, 1, width=32)),
    (2, st.sampled_from([-0.0, 1.0, 1.0000001, 1e-45, math.nan, math.inf, -1.0])),
    (1, F32),
)
SEED_LISTS = repeated(U64, 8, (10, 40, 100, 500))
MODELS = weighted((4, st.sampled_from(SERVED_MODELS)), (1, NAMES))  # mostly past the model lookup


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        model=draw(MODELS), version=draw(VERSIONS), labels=draw(LABEL_LISTS),
        truncation=draw(TRUNCATIONS), output=draw(OUTPUTS),
    )  # fmt: skip
    kind = draw(weighted((3, st.just("seeds")), (3, st.just("seed_range")), (2, st.just("rows")), (1, st.none())))
    if kind == "seeds":
        request.seeds.SetInParent()
        request.seeds.seeds.extend(draw(weighted((3, st.lists(U64, min_size=1, max_size=8)), (1, SEED_LISTS))))
    elif kind == "seed_range":
        request.seed_range.SetInParent()
        request.seed_range.start = draw(weighted((3, st.integers(0, 10**6)), (1, U64)))
        request.seed_range.count = draw(weighted((4, st.integers(0, 70)), (1, U32)))
    elif kind == "rows":
        request.rows.SetInParent()
        request.rows.values.extend(draw(latent_values(st.one_of(st.integers(0, 4), st.sampled_from([65, 257])))))
    return request


@st.composite
def keyframes(draw, labelled: bool) -> pb.Keyframe:
    """A keyframe by seed or row (or neither), with a label when `labelled` (and now and then against it)."""
    key = pb.Keyframe()
    kind = draw(weighted((3, st.just("seed")), (2, st.just("row")), (1, st.none())))
    if kind == "seed":
        key.seed = draw(U64)
    elif kind == "row":
        key.row.SetInParent()
        key.row.values.extend(draw(latent_values(st.just(1))))
    if labelled != (draw(st.integers(0, 9)) == 0):
        key.label.CopyFrom(draw(labels()))
    return key


@st.composite
def interpolate_requests(draw) -> pb.InterpolateRequest:
    key = keyframes(draw(st.booleans()))
    return pb.InterpolateRequest(
        model=draw(MODELS),
        version=draw(VERSIONS),
        keyframes=draw(weighted((3, st.lists(key, min_size=2, max_size=4)), (1, repeated(key, 4, (2, 100, 1500))))),
        steps=draw(weighted((4, st.integers(0, 8)), (1, U32))),
        method=draw(weighted((4, st.sampled_from([0, 1, 2])), (1, I32))),
        truncation=draw(TRUNCATIONS),
        output=draw(OUTPUTS),
        animation=draw(st.none() | ANIMATIONS),
        more_paths=draw(
            weighted(
                (4, st.just([])),
                (1, st.lists(st.builds(pb.KeyframePath, keyframes=st.lists(key, min_size=1, max_size=4)), max_size=3)),
            )
        ),
    )


DIRECTIONS = weighted((4, st.sampled_from(["first", "per_class", "ink", "slant", "sefa1"])), (1, NAMES))
STRENGTH_LISTS = weighted(
    (4, st.lists(FINITE, min_size=1, max_size=8)), (1, st.lists(st.floats(width=32), max_size=70))
)


@st.composite
def edit_requests(draw) -> pb.EditRequest:
    """Generate's latents, labels and output, a direction by name or a vector (or neither, or both), strengths."""
    base = draw(generate_requests())
    request = pb.EditRequest(
        model=base.model, version=base.version, labels=base.labels, truncation=base.truncation, output=base.output,
        strengths=draw(STRENGTH_LISTS), animation=draw(weighted((4, st.none()), (1, ANIMATIONS))),
    )  # fmt: skip
    kind = base.WhichOneof("latents")
    if kind:
        getattr(request, kind).CopyFrom(getattr(base, kind))
    along = draw(weighted((4, st.just("direction")), (2, st.just("vector")), (1, st.none())))
    if along == "direction":
        request.direction = draw(DIRECTIONS)
    elif along == "vector":
        request.vector.values.extend(draw(latent_values(st.just(1))))
    return request


@st.composite
def invert_requests(draw) -> pb.InvertRequest:
    """Image files (a real PNG of the echo model's 4×2 now and then, else any bytes) or raw pixels, refine passes."""
    real = encode.png(np.zeros((2, 4, 1), np.uint8))
    files = weighted((3, st.lists(st.one_of(st.just(real), st.binary(max_size=64)), max_size=4)), (1, st.just([])))
    return pb.InvertRequest(
        model=draw(MODELS), version=draw(VERSIONS), images=draw(files),
        pixels=draw(weighted((4, st.just(b"")), (1, st.binary(max_size=40)))),
        refine_passes=draw(weighted((4, st.integers(0, 64)), (1, U32))), output=draw(OUTPUTS),
    )  # fmt: skip


# Every format (and numbers past the enum), frame rates in and out of range, NaN and infinities, loop counts.
ANIMATIONS = st.builds(
    pb.AnimationOptions, format=weighted((4, st.sampled_from([0, 1, 2, 3])), (1, I32)),
    fps=weighted((4, st.floats(0, 60, width=32)), (1, st.floats(width=32))), ping_pong=st.booleans(),
    loops=weighted((4, st.integers(0, 3)), (1, U32)),
)  # fmt: skip
P = oip.InferParameter
OIP_VERSIONS = weighted((6, st.just("")), (1, st.sampled_from(["1", "2", "3", "0", "-1", "01", "x", "1.0"])),
                        (1, st.text(max_size=6)))  # fmt: skip
PARAMETERS = st.one_of(
    st.builds(P, bool_param=st.booleans()), st.builds(P, int64_param=st.integers(-(2**63), 2**63 - 1)),
    st.builds(P, uint64_param=U64), st.builds(P, double_param=st.floats()),
    st.builds(P, string_param=st.one_of(st.sampled_from(["0-3", "1,5,9", "7", "0-70", "3,x", "9-2", "0-1,2-3", "cat",
                                                        "0," * 40, "18446744073709551615", "first", "ink", "-3,0,3",
                                                        "1e9", "nan"]), st.text(max_size=12))),
    st.just(P()),
)  # fmt: skip
PARAMETER_KEYS = weighted(
    (6, st.sampled_from(["seeds", "seed_start", "count", "labels", "truncation"])),
    (1, st.sampled_from(["binary_data_output", "priority", "seed", "direction", "strengths"])),
    (1, st.text(max_size=8)),
)
DATATYPES = weighted((5, st.just("FP32")), (1, st.sampled_from(["UINT8", "INT64", "FP16", "BYTES", "", "fp32"])))
SHAPES = weighted(
    (4, st.tuples(st.sampled_from([1, 2, 3, 65]), st.sampled_from([*LATENT_DIMS, 3, 10])).map(list)),
    (1, st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4)),
)


@st.composite
def infer_requests(draw) -> oip.ModelInferRequest:
    """Seeds as parameters, or z/y tensors in typed contents or raw bytes; names, shapes and types now and then off."""
    request = oip.ModelInferRequest(
        model_name=draw(MODELS), model_version=draw(OIP_VERSIONS), id=draw(st.text(max_size=4))
    )
    for key, value in draw(st.lists(st.tuples(PARAMETER_KEYS, PARAMETERS), max_size=4)):
        request.parameters[key].CopyFrom(value)
    raw = draw(st.booleans())
    for _ in range(draw(weighted((2, st.just(0)), (3, st.just(1)), (2, st.just(2)), (1, st.just(3))))):
        shape = draw(SHAPES)
        tensor = request.inputs.add(name=draw(weighted((5, st.sampled_from(["z", "y"])), (1, st.text(max_size=3)))),
                                    datatype=draw(DATATYPES), shape=shape)  # fmt: skip
        size = max(0, math.prod(shape) if all(0 <= d < 1000 for d in shape) else 3) + draw(st.sampled_from([0, 0, 1]))
        values = draw(latent_values(st.just(1)))[:1] * size if size < 10**5 else []
        if raw:
            request.raw_input_contents.append(
                draw(st.one_of(st.just(struct.pack(f"<{len(values)}f", *values)), st.binary(max_size=9)))
            )
        else:
            tensor.contents.fp32_contents.extend(values)
    for _ in range(draw(st.integers(0, 2))):
        out = request.outputs.add(name=draw(st.sampled_from(["images", "points", "x"])))
        if draw(st.booleans()):
            out.parameters["datatype"].string_param = draw(st.sampled_from(["UINT8", "FP32", "INT8", ""]))
    return request


REQUESTS: dict[str, st.SearchStrategy[message.Message]] = {
    "ganserve.v1.ListModelsRequest": st.just(pb.ListModelsRequest()),
    "ganserve.v1.GetModelRequest": st.builds(pb.GetModelRequest, name=NAMES, version=VERSIONS),
    "ganserve.v1.GenerateRequest": generate_requests(),
    "ganserve.v1.InterpolateRequest": interpolate_requests(),
    "ganserve.v1.EditRequest": edit_requests(),
    "ganserve.v1.InvertRequest": invert_requests(),
    "ganserve.v1.RepositoryIndexRequest": st.builds(pb.RepositoryIndexRequest, ready_only=st.booleans()),
    "ganserve.v1.LoadModelRequest": st.builds(pb.LoadModelRequest, name=NAMES, version=VERSIONS),
    # Never the models the rest of the fuzz needs: unloading them would leave nothing to fuzz.
    "ganserve.v1.UnloadModelRequest": st.builds(
        pb.UnloadModelRequest, name=NAMES.filter(lambda n: n not in SERVED_MODELS), version=VERSIONS
    ),
    "inference.ServerLiveRequest": st.just(oip.ServerLiveRequest()),
    "inference.ServerReadyRequest": st.just(oip.ServerReadyRequest()),
    "inference.ServerMetadataRequest": st.just(oip.ServerMetadataRequest()),
    "inference.ModelReadyRequest": st.builds(oip.ModelReadyRequest, name=NAMES, version=OIP_VERSIONS),
    "inference.ModelMetadataRequest": st.builds(oip.ModelMetadataRequest, name=NAMES, version=OIP_VERSIONS),
    "inference.ModelInferRequest": infer_requests(),
    "grpc.health.v1.HealthCheckRequest": st.builds(
        health_pb2.HealthCheckRequest, service=st.one_of(st.sampled_from(["", "ganserve.v1.Generator"]), NAMES)
    ),
    "grpc.reflection.v1alpha.ServerReflectionRequest": st.builds(
        reflection_pb2.ServerReflectionRequest, list_services=st.text(max_size=8)
    ),
}


def requests_for(method: descriptor.MethodDescriptor) -> st.SearchStrategy[message.Message]:
    """The typed strategy of the method's request type; an empty message for a type added later."""
    return REQUESTS.get(method.input_type.full_name, st.builds(request_class(method)))


# Methods in proportion to how many fields their request has: Generate, GenerateStream and Interpolate most.
TYPED_METHODS = weighted(*((1 + len(m.input_type.fields), st.just((path, m))) for path, m in GANSERVE))
# A request each method answers with OK, for the header fuzz and as a start for mutations.
SEEDS_1_2 = pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[1, 2]))
VALID = {
    "ganserve.v1.GetModelRequest": pb.GetModelRequest(name="plain"),
    "ganserve.v1.GenerateRequest": SEEDS_1_2,
    "ganserve.v1.InterpolateRequest": pb.InterpolateRequest(
        model="plain", keyframes=[pb.Keyframe(seed=1), pb.Keyframe(seed=2)], steps=2
    ),
    "ganserve.v1.EditRequest": pb.EditRequest(
        model="echo", seeds=pb.SeedList(seeds=[1]), labels=[pb.Label(index=0)], direction="first", strengths=[1]
    ),
    "ganserve.v1.LoadModelRequest": pb.LoadModelRequest(name=SPARE),
    "inference.ModelReadyRequest": oip.ModelReadyRequest(name="plain"),
    "inference.ModelMetadataRequest": oip.ModelMetadataRequest(name="plain"),
    "inference.ModelInferRequest": oip.ModelInferRequest(
        model_name="plain", parameters={"seeds": P(string_param="1-2")}
    ),
    "ganserve.v1.UnloadModelRequest": pb.UnloadModelRequest(name=SPARE),
}


def valid_request(method: descriptor.MethodDescriptor) -> message.Message:
    return VALID.get(method.input_type.full_name) or request_class(method)()


@st.composite
def typed_cases(draw) -> Case:
    path, method = draw(TYPED_METHODS)
    request = draw(requests_for(method))
    return Case("typed", path, method, request.SerializeToString(), timeout=draw(DEADLINES), request=request)


# ---- raw bytes ------------------------------------------------------------------------------------------------


@st.composite
def mutated(draw, method: descriptor.MethodDescriptor) -> bytes:
    """A valid serialized request with a few bytes flipped, inserted, removed, repeated or cut off."""
    data = bytearray(draw(st.one_of(st.just(valid_request(method)), requests_for(method))).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        elif op == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 16))] * draw(st.integers(1, 4))
    return bytes(data)


IDENT = st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=16)
UNKNOWN_PATHS = st.builds(
    "/{}/{}".format, st.sampled_from([*(s.full_name for s in SERVICES), "no.Such", "ganserve.v2.Generator"]), IDENT
).filter(lambda p: p not in dict(METHODS))


@st.composite
def raw_cases(draw) -> Case:
    if draw(st.integers(0, 15)) == 0:
        return Case("raw", draw(UNKNOWN_PATHS), None, draw(st.binary(max_size=64)))
    path, method = draw(st.sampled_from(METHODS))
    body = draw(st.one_of(st.binary(max_size=512), mutated(method)))
    return Case("raw", path, method, body)


# ---- header garbage -------------------------------------------------------------------------------------------

# Keys as gRPC allows them: lowercase ascii, digits, '-', '_', '.', and HTTP/2's own names, which the client drops.
# Not `grpc-*`, reserved for gRPC itself: the client sends some of them on, and a `grpc-status` on a call that stays
# open (Health.Watch) stalls it inside gRPC, before any handler runs (a bare grpcio health server does the same).
KEYS = st.one_of(
    st.sampled_from(["te", "content-type", "host", "user-agent", "authority", "x-forwarded-for"]),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=24),
).filter(lambda k: not k.endswith("-bin") and not k.startswith("grpc-"))
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
BIG = st.integers(0, 8 << 10)  # a value of up to 8 KiB; a few of them pass the server's 16 KiB header limit
VALUES = st.one_of(
    st.text(PRINTABLE, max_size=64).map(str.strip), st.builds(lambda c, n: c * n, PRINTABLE.filter(str.strip), BIG)
)
BIN_VALUES = st.one_of(st.binary(max_size=256), st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=1), BIG))
AUTHORIZATION = st.one_of(
    st.sampled_from(["", "Bearer", "Bearer ", "bearer", "Basic Zm9vOmJhcg==", "Bearer a b c", "BEARER x", "Token x"]),
    st.builds("Bearer {}".format, VALUES),
    VALUES,
)
HEADERS = st.one_of(
    st.tuples(KEYS, VALUES),
    st.tuples(KEYS.map(lambda k: k + "-bin"), BIN_VALUES),
    st.tuples(st.just("authorization"), AUTHORIZATION),
)


@st.composite
def metadata_cases(draw, also: tuple[tuple[str, str], ...] = ()) -> Case:
    """A valid request with 1-4 garbage headers; `also` headers (a token) go first on half of the cases."""
    path, method = draw(st.sampled_from(METHODS))
    request = valid_request(method)
    headers = (also if draw(st.booleans()) else ()) + tuple(draw(st.lists(HEADERS, min_size=1, max_size=4)))
    return Case("metadata", path, method, request.SerializeToString(), metadata=headers, request=request)


# ---- the server -----------------------------------------------------------------------------------------------

LIMITS = {"max_images": 64, "max_stream_images": 256}  # small, so that the fuzz reaches past them often


def build_repository(root: Path) -> Path:
    """echo (conditional), plain at two versions, and the spare model the fuzz may unload."""
    echo_model(root / "echo" / "1" / "model.onnx")
    echo_encoder(root / "echo" / "1")
    plain_model(root / "plain" / "1" / "model.onnx")
    plain_model(root / "plain" / "2" / "model.onnx")
    plain_model(root / SPARE / "1" / "model.onnx")
    return root


def open_channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)])


def served_services(channel: grpc.Channel, metadata: tuple = ()) -> set[str]:
    """The services the server has, by its reflection."""
    ask = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(ask, metadata=metadata, timeout=10)
    return {s.name for a in answers for s in a.list_services_response.service}


def alive(channel: grpc.Channel, metadata: tuple = ()) -> None:
    """Health says SERVING and a plain Generate answers."""
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert len(pb_grpc.GeneratorStub(channel).Generate(SEEDS_1_2, metadata=metadata, timeout=10).images) == 2
