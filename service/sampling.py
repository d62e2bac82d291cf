"""The data plane: validated domain requests in, encoded images out. No gRPC, no ONNX.

The servicer turns protobuf into these types and back; everything that decides anything lives here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service import encode, latents
from service.errors import InvalidArgument, short
from service.registry import ModelVersion, Registry

FORMATS = ("png", "uint8", "float32")


@dataclass(frozen=True)
class Limits:
    max_images: int = 1024  # per Generate / Interpolate request
    max_stream_images: int = 65536  # per GenerateStream request
    stream_chunk: int = 64  # images per streamed message

    def __post_init__(self) -> None:
        for name in ("max_images", "max_stream_images", "stream_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")


@dataclass(frozen=True)
class Label:
    """Exactly one of: a class index, a class name, or soft weights over the classes."""

    index: int | None = None
    name: str | None = None
    soft: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Output:
    format: str = "png"
    grid: bool = False
    grid_columns: int = 0
    return_latents: bool = False
    grid_only: bool = False


@dataclass(frozen=True)
class Result:
    images: list[bytes]
    image_shape: tuple[int, ...]
    grid_png: bytes = b""
    latents: np.ndarray | None = None
    offset: int = 0


def label_vectors(mv: ModelVersion, labels: Sequence[Label], n: int, field: str = "labels") -> np.ndarray | None:
    """The float32 [n, num_classes] y input; one label for all samples or one per sample."""
    spec = mv.spec
    if not spec.num_classes:
        if labels:
            raise InvalidArgument(f"{field}: model {mv.name!r} is unconditional and takes no labels")
        return None
    if len(labels) not in (1, n):
        raise InvalidArgument(f"{field}: expected 1 or {n} labels for {n} samples, got {len(labels)}")
    rows = np.stack([_label_row(spec.class_names, lab, f"{field}[{i}]") for i, lab in enumerate(labels)])
    return np.ascontiguousarray(np.broadcast_to(rows, (n, spec.num_classes)), dtype=np.float32)


def _label_row(class_names: tuple[str, ...], label: Label, field: str) -> np.ndarray:
    nc = len(class_names)
    row = np.zeros(nc, np.float32)
    if label.soft is not None:
        w = np.asarray(label.soft, np.float64)
        if len(w) != nc:
            raise InvalidArgument(f"{field}.soft: expected {nc} weights, got {len(w)}")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise InvalidArgument(f"{field}.soft: weights must be finite, non-negative and not all zero")
        return (w / w.sum()).astype(np.float32)
    if label.name is not None:
        if label.name not in class_names:
            raise InvalidArgument(
                f"{field}.name: unknown class {short(label.name)} (classes: {', '.join(class_names)})"
            )
        row[class_names.index(label.name)] = 1
        return row
    if label.index is None:
        raise InvalidArgument(f"{field}: give an index, a name or soft weights")
    if not 0 <= label.index < nc:
        raise InvalidArgument(f"{field}.index: unknown class {label.index} (the model has {nc} classes)")
    row[label.index] = 1
    return row


def check_rows(values: np.ndarray, latent_dim: int, field: str) -> np.ndarray:
    """Explicit latents: a flat float array of whole rows, all finite → [n, latent_dim]."""
    if values.size == 0 or values.size % latent_dim:
        raise InvalidArgument(f"{field}: {values.size} values is not a positive multiple of latent_dim {latent_dim}")
    if not np.all(np.isfinite(values)):
        raise InvalidArgument(f"{field}: latents must be finite (found NaN or Inf)")
    return values.reshape(-1, latent_dim).astype(np.float32, copy=False)


def image_bytes(mv: ModelVersion, output: Output) -> int:
    """Upper bound of one image's bytes on the wire (PNG never exceeds raw uint8 by more than its headers)."""
    c, h, w = mv.spec.image_shape
    return c * h * w * (4 if output.format == "float32" else 1) + 128


def check_truncation(psi: float) -> float | None:
    if psi == 0:
        return None
    if not (math.isfinite(psi) and 0 < psi <= 1):
        raise InvalidArgument(f"truncation: must be in (0, 1], or 0 for none (got {psi})")
    return psi


class Sampler:
    """Turns requests into batcher work and encoded images; encoding runs on `encoder`, not the event loop."""

    def __init__(
        self, registry: Registry, limits: Limits, encoder: Executor | None = None, max_message: int = 64 << 20
    ):
        self.registry, self.limits, self.encoder, self.max_message = registry, limits, encoder, max_message

    def model(self, name: str, version: int) -> ModelVersion:
        if not name:
            raise InvalidArgument("model: required")
        return self.registry.get(name, version)

    async def latents(self, mv: ModelVersion, seeds: Sequence[int] | None, rows: np.ndarray | None, field: str):
        if seeds is not None:
            if len(seeds) > 64:  # ~12 µs a seed: thousands would stall every other caller on the event loop
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    self.encoder, latents.seed_latents, list(seeds), mv.spec.latent_dim, mv.spec.prior
                )
            return latents.seed_latents(list(seeds), mv.spec.latent_dim, mv.spec.prior)
        if rows is not None:
            return check_rows(rows, mv.spec.latent_dim, field)
        raise InvalidArgument("latents: give seeds, seed_range or rows")

    async def _encode(self, mv: ModelVersion, images: np.ndarray, output: Output, offset: int = 0) -> Result:
        # Raw bytes cost microseconds: a thread hand-off would cost more. PNG and grids leave the event loop.
        if output.format != "png" and not output.grid:
            return _encode(mv, images, output, offset)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.encoder, _encode, mv, images, output, offset)

    async def generate(
        self,
        mv: ModelVersion,
        z: np.ndarray,
        labels: Sequence[Label],
        truncation: float,
        output: Output,
        deadline: float | None,
    ) -> Result:
        n = len(z)
        if n > self.limits.max_images:
            raise InvalidArgument(f"latents: {n} images requested, the limit per request is {self.limits.max_images}")
        copies = (not output.grid_only) + output.grid  # the images, the grid, or both
        size = n * image_bytes(mv, output) * copies
        if size > self.max_message:
            raise InvalidArgument(
                f"latents: {n} images of this model make a response of about {size:,} bytes, over the"
                f" {self.max_message:,}-byte message limit; use GenerateStream"
            )
        z, y = _prepare(mv, z, labels, truncation, output)
        images = await mv.run(z, y, deadline)
        result = await self._encode(mv, images, output)
        return result if not output.return_latents else _with_latents(result, z)

    async def stream(
        self,
        mv: ModelVersion,
        z: np.ndarray,
        labels: Sequence[Label],
        truncation: float,
        output: Output,
        deadline: float | None,
    ) -> AsyncIterator[Result]:
        """Chunks of `stream_chunk` images; two chunks in flight keep the batcher busy while one is sent."""
        # Chunks fit in half a message whatever the image size, so no stream ever hits the limit.
        n = len(z)
        chunk = max(1, min(self.limits.stream_chunk, self.max_message // (2 * image_bytes(mv, output))))
        if n > self.limits.max_stream_images:
            raise InvalidArgument(f"latents: {n} images requested, the stream limit is {self.limits.max_stream_images}")
        if output.grid:
            raise InvalidArgument("output.grid: not available on GenerateStream; use Generate")
        z, y = _prepare(mv, z, labels, truncation, output)

        async def part(start: int) -> Result:
            stop = min(start + chunk, n)
            images = await mv.run(z[start:stop], None if y is None else y[start:stop], deadline)
            result = await self._encode(mv, images, output, offset=start)
            return result if not output.return_latents else _with_latents(result, z[start:stop])

        pending: list[asyncio.Task[Result]] = []
        try:
            for start in range(0, n, chunk):
                pending.append(asyncio.ensure_future(part(start)))
                if len(pending) == 2:
                    yield await pending.pop(0)
            while pending:
                yield await pending.pop(0)
        finally:
            for task in pending:
                task.cancel()

    async def interpolate(
        self,
        mv: ModelVersion,
        keys: np.ndarray,
        key_labels: Sequence[Label],
        steps: int,
        method: str,
        truncation: float,
        output: Output,
        deadline: float | None,
    ) -> Result:
        if len(keys) < 2:
            raise InvalidArgument(f"keyframes: at least 2 needed, got {len(keys)}")
        if steps < 1:
            raise InvalidArgument("steps: must be >= 1")
        frames = (len(keys) - 1) * steps + 1
        if frames > self.limits.max_images:
            limit = self.limits.max_images
            raise InvalidArgument(f"steps: {frames} frames requested, the limit per request is {limit}")
        z = latents.path(keys, steps, method)
        labels: list[Label] = []
        if mv.spec.num_classes:
            if len(key_labels) != len(keys):
                raise InvalidArgument(f"keyframes: every keyframe of conditional model {mv.name!r} needs a label")
            y_keys = label_vectors(mv, key_labels, len(keys), field="keyframes.label")
            y = latents.path(y_keys, steps, "lerp")  # labels blend linearly: soft labels between classes
            labels = [Label(soft=tuple(map(float, row))) for row in y]
        elif any(lab is not None for lab in key_labels):
            raise InvalidArgument(f"keyframes.label: model {mv.name!r} is unconditional and takes no labels")
        strip = output if output.grid_columns else dataclasses.replace(output, grid_columns=frames)
        return await self.generate(mv, z, labels, truncation, strip, deadline)


def _prepare(
    mv: ModelVersion, z: np.ndarray, labels: Sequence[Label], truncation: float, output: Output
) -> tuple[np.ndarray, np.ndarray | None]:
    """Check the output options and labels, apply truncation: the model's (z, y) inputs."""
    if output.format not in FORMATS:
        raise InvalidArgument(f"output.format: must be one of {', '.join(FORMATS)}")
    if output.grid_only and not output.grid:
        raise InvalidArgument("output.grid_only: needs output.grid")
    y = label_vectors(mv, labels, len(z))
    psi = check_truncation(truncation)
    return (z if psi is None else latents.truncate(z, psi)), y


def _with_latents(result: Result, z: np.ndarray) -> Result:
    return dataclasses.replace(result, latents=z)


def _encode(mv: ModelVersion, images: np.ndarray, output: Output, offset: int) -> Result:
    """Vectorised float → uint8 once; then per-image bytes and an optional grid."""
    pixels = encode.to_uint8(images, mv.spec.output_range) if output.format != "float32" or output.grid else None
    grid_png = b""
    if output.grid:
        cols = output.grid_columns or math.ceil(math.sqrt(len(pixels)))
        grid_png = encode.png(encode.grid(pixels, cols))
    if output.grid_only:
        return Result([], tuple(pixels.shape[1:]), grid_png, offset=offset)
    if output.format == "float32":
        data = np.ascontiguousarray(images, dtype="<f4")
        return Result([img.tobytes() for img in data], tuple(data.shape[1:]), grid_png, offset=offset)
    if output.format == "uint8":
        return Result([p.tobytes() for p in pixels], tuple(pixels.shape[1:]), grid_png, offset=offset)
    return Result([encode.png(p) for p in pixels], tuple(pixels.shape[1:]), grid_png, offset=offset)
