"""Fixtures for service tests: tiny ONNX generators built with onnx.helper, and an in-process server."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper

from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.config import RuntimeConfig, ServerConfig
from service.contract import Direction, EncoderSpec, ModelSpec, file_sha256
from service.repository import ENCODER_FILE
from service.runtime import Session
from service.server import Server
from service.tracing import Tracing

ECHO_LATENT, ECHO_CLASSES = 5, ("cat", "dog", "eel")
_AXES = np.eye(ECHO_LATENT)
# Edits show in the echo model's images: `first` moves z[0] for every class, `per_class` z[1 + class].
ECHO_DIRECTIONS = (
    Direction("first", "sefa", "z[0]", tuple(_AXES[0])),
    Direction("per_class", "attribute", "z[1 + class]", tuple(_AXES[4]), tuple(tuple(_AXES[1 + c]) for c in range(3))),
)


def _save(graph: onnx.GraphProto, path: Path, spec: ModelSpec) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, spec.to_metadata())
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def _spec(
    latent: int, classes: tuple[str, ...], shape: tuple[int, ...], prior: str = "normal", directions=()
) -> ModelSpec:
    return ModelSpec("image", latent, prior, classes, shape, (-1.0, 1.0), directions)


def echo_model(path: Path) -> Path:
    """Conditional: images [n, 1, 2, 4] = concat(clip(z, −1, 1) [n, 5], y [n, 3]) — output shows its inputs. Its
    directions are ECHO_DIRECTIONS."""
    lo, hi = (
        helper.make_tensor("lo", TensorProto.FLOAT, [], [-1.0]),
        helper.make_tensor("hi", TensorProto.FLOAT, [], [1.0]),
    )
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 1, 2, 4])
    nodes = [
        helper.make_node("Clip", ["z", "lo", "hi"], ["zc"]),
        helper.make_node("Concat", ["zc", "y"], ["flat"], axis=1),
        helper.make_node("Reshape", ["flat", "shape"], ["images"]),
    ]
    graph = helper.make_graph(
        nodes, "echo",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", ECHO_LATENT]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", len(ECHO_CLASSES)])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 2, 4])],
        initializer=[lo, hi, shape],
    )  # fmt: skip
    return _save(graph, path, _spec(ECHO_LATENT, ECHO_CLASSES, (1, 2, 4), directions=ECHO_DIRECTIONS))


def echo_encoder(folder: Path) -> Path:
    """The echo model's exact inverse, encoder.onnx beside folder/model.onnx: z = the image's first 5 values, logits its
    last 3 (the label the echo model drew)."""
    starts = [helper.make_tensor(f"s{i}", TensorProto.INT64, [1], [v]) for i, v in enumerate((0, 5, 8))]
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [1])
    flat = helper.make_tensor("flat_shape", TensorProto.INT64, [2], [-1, 8])
    nodes = [
        helper.make_node("Reshape", ["images", "flat_shape"], ["flat"]),
        helper.make_node("Slice", ["flat", "s0", "s1", "axis"], ["z"]),
        helper.make_node("Slice", ["flat", "s1", "s2", "axis"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "echo-encoder", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", ECHO_LATENT]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(ECHO_CLASSES)])],
        initializer=[*starts, axis, flat],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = EncoderSpec(file_sha256(folder / "model.onnx"), ECHO_LATENT, ECHO_CLASSES, (1, 2, 4), (-1.0, 1.0))
    helper.set_model_props(model, spec.to_metadata())
    onnx.save_model(model, str(folder / ENCODER_FILE))
    return folder / ENCODER_FILE


def plain_model(path: Path, shape: tuple[int, int, int] = (1, 2, 4), prior: str = "normal", gain: float = 1.0) -> Path:
    """Unconditional: images [n, *shape] = clip(z [n, C·H·W]) — each image shows its latent.

    With a uniform prior and gain 1/√3 (z ← gain·z before the clip), the images are uniform noise: the worst case
    for PNG sizes. A test that needs a model to take a while gates its runs instead (testkit.gated).
    """
    d = int(np.prod(shape))
    lo, hi = (
        helper.make_tensor("lo", TensorProto.FLOAT, [], [-1.0]),
        helper.make_tensor("hi", TensorProto.FLOAT, [], [1.0]),
    )
    reshape = helper.make_tensor("shape", TensorProto.INT64, [4], [-1, *shape])
    inits, nodes, x = [lo, hi, reshape], [], "z"
    if gain != 1.0:
        inits.append(helper.make_tensor("gain", TensorProto.FLOAT, [], [gain]))
        nodes.append(helper.make_node("Mul", [x, "gain"], ["scaled"]))
        x = "scaled"
    nodes += [helper.make_node("Clip", [x, "lo", "hi"], ["c"]), helper.make_node("Reshape", ["c", "shape"], ["images"])]
    graph = helper.make_graph(
        nodes, "plain",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", d])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", *shape])],
        initializer=inits,
    )  # fmt: skip
    return _save(graph, path, _spec(d, (), shape, prior))


# What `running` sets unless a test says otherwise: what every server test would otherwise pay for and few use.
# - No metrics endpoint: its HTTP server takes up to half a second to shut down (its poll interval). Metrics are
#   read from server.metrics.registry; a test of the endpoint itself asks for metrics_port=0.
# - Batch size as set, not measured: the registry times every batch size for 0.05 s at each load, and a tiny test
#   model always picks max_batch_size (its per-batch overhead dwarfs the work); `measure=True` keeps the timing.
QUICK = {"metrics_port": -1}
STOP_GRACE_S = 0.4  # the drain's quiet spell is a quarter of it; tests await their calls before they leave


def server_config(repository: Path, measure: bool = False, **changes) -> ServerConfig:
    """Flags as a test server runs with: loopback, free ports, and QUICK unless `changes` or `measure` say so."""
    flags = {"host": "127.0.0.1", "port": 0, "http_port": 0} | QUICK | changes
    cfg = ServerConfig.from_flags(model_repository=str(repository), **flags)
    if measure or cfg.batching.preferred_batch_size:
        return cfg
    batching = dataclasses.replace(cfg.batching, preferred_batch_size=cfg.batching.max_batch_size)
    return dataclasses.replace(cfg, batching=batching)


@contextlib.asynccontextmanager
async def running(
    repository: Path,
    session_factory: Callable[[Path, RuntimeConfig], object] | None = None,
    measure: bool = False,
    tracing: Tracing | None = None,
    **changes,
) -> AsyncIterator[tuple[Server, pb_grpc.GeneratorStub, grpc.aio.Channel]]:
    """A real server on free ports over `repository`, and a stub connected to it; `session_factory` (testkit.gated)
    replaces the registry's way of opening model files, before any is opened; `tracing` (service.tracing.configure)
    is where its spans go."""
    cfg = server_config(repository, measure, **changes)
    server = Server(cfg, session_factory=session_factory or Session, tracing=tracing)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, pb_grpc.GeneratorStub(channel), channel
    finally:
        await channel.close()
        await server.stop(grace=STOP_GRACE_S)


async def call_raw(
    channel: grpc.aio.Channel, path: str, streaming_request: bool, streaming_response: bool, metadata: tuple = ()
) -> grpc.StatusCode:
    """Call `path` with an empty message (valid bytes for any request type) as its kind says; the status."""
    try:
        if streaming_request:
            async for _ in channel.stream_stream(path)(iter([b""]), metadata=metadata, timeout=2):
                pass
        elif streaming_response:
            async for _ in channel.unary_stream(path)(
                b"", metadata=metadata, timeout=0.5
            ):  # Health.Watch never ends by itself
                pass
        else:
            await channel.unary_unary(path)(b"", metadata=metadata, timeout=2)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def drained(server: Server) -> bool:
    """No version is leaving: every one that left has finished its requests and freed its session."""
    return all(s.state != "UNLOADING" for s in server.registry.status())
