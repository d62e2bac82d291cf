"""The data plane: domain requests in, domain results out. No gRPC, no ONNX; every front end shares it.

A front end turns its wire message into one request object of service/domain.py, in one pass and without
judging it. Everything that decides anything lives here: limits, ranges and validation (every message names
the field in the caller's words, from the request's Names), labels, latents, batching, PNG encoding and the
response size. Results carry arrays; each front end picks its own form for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor

import numpy as np

from service import contract, encode, inversion, latents, tracing
from service.batcher import HIGH, NORMAL
from service.cache import ResultCache
from service.config import Limits
from service.domain import (
    NO_NAMES,
    Edit,
    Format,
    Generate,
    Infer,
    Interpolate,
    Invert,
    Inverted,
    Keyframe,
    Label,
    ModelInfo,
    Names,
    Output,
    Result,
    Rows,
    SeedRange,
    Seeds,
)
from service.errors import FailedPrecondition, InvalidArgument, QueueFull, short
from service.registry import ModelVersion, Registry

METHODS = ("slerp", "lerp")
SEEDS_ON_LOOP = 64  # ~12 µs a seed: more would stall every other caller on the event loop
PNGS_ON_LOOP = 1  # ~150 µs a PNG (Pillow, 28x28)
DEFAULT_FPS, MIN_FPS, MAX_FPS = 12.0, 1.0, 50.0  # GIF counts frame times in hundredths of a second
MAX_LOOPS = 65535  # what GIF's and APNG's loop fields hold
MAX_REFINE = 10_000  # generator passes per image: about 2 s of the shipped model's time for one image on 2 cores
MAX_REFINE_TOTAL = 20_000  # images × passes per request: one call holds the model for at most a few seconds
MAX_STRENGTHS = 64
MAX_STRENGTH = 100.0  # standard deviations of the prior along a unit direction: far past any useful edit


class DataPlane:
    """Validates requests, runs them through the model's batcher, encodes the images off the event loop."""

    def __init__(
        self, registry: Registry, limits: Limits, encoder: Executor | None = None, full_metadata: bool = False,
        cache: ResultCache | None = None, tracing: tracing.Tracing | None = None,
    ):  # fmt: skip
        """`tracing`: what records a traced call's queue, run and encoding (service/tracing.py); None: off."""
        self.registry, self.limits, self.encoder, self.full_metadata = registry, limits, encoder, full_metadata
        self.cache, self.tracing = cache, tracing

    # ---- models ------------------------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        return [self._info(self.registry.get(name)) for name in sorted(self.registry.models)]

    def get_model(self, name: str, version: int = 0, names: Names = NO_NAMES) -> ModelInfo:
        """One model version's description; errors name the request's `model` and `version` in its words."""
        if not name:
            raise InvalidArgument(f"{names('model')}: required")
        return self._info(self.registry.get(name, version, names))

    def is_ready(self, name: str, version: int = 0) -> bool:
        """Whether the model (that version of it; 0: any) serves now."""
        versions = self.registry.models.get(name, {})
        return bool(versions) and (version == 0 or version in versions)

    def _info(self, mv: ModelVersion) -> ModelInfo:
        versions = self.registry.versions(mv.name)
        metadata = mv.session.metadata
        if not self.full_metadata:  # the documented keys only: `config` holds paths of the machine that trained it
            metadata = {k: v for k, v in metadata.items() if k in contract.DOCUMENTED_KEYS}
        return ModelInfo(mv.name, mv.version, versions, mv.spec, mv.session.provider, metadata, mv.encoder is not None)

    def _use(
        self, req: Generate | Interpolate | Infer | Edit | Invert
    ) -> contextlib.AbstractContextManager[ModelVersion]:
        """The version held for the request: if it leaves meanwhile, the request still finishes on it."""
        if not req.model:
            raise InvalidArgument(f"{req.names('model')}: required")
        return self.registry.use(req.model, req.version, req.names)

    # ---- generation --------------------------------------------------------------------------------

    async def generate(self, req: Generate, deadline: float | None = None) -> Result:
        names = req.names
        with self._use(req) as mv:
            output = _check_output(req.output, names)
            n = _count(req.latents, mv.spec.latent_dim, self.limits.max_images, names)
            self._check_size(mv, n, output, "latents", names)
            y = _label_vectors(mv, req.labels, n, self.limits.max_images, names)
            psi = _truncation(req.truncation, names)
            key = _cache_key(mv, req) if self.cache is not None else None
            if key is not None and (hit := self.cache.get(key)) is not None:
                if self.tracing is not None and (span := tracing.current()) is not None:
                    self.tracing.cached(span, mv.version)
                return hit
            mv.batcher.check_room(n)  # before any latent is built: a full queue answers in microseconds
            spec = req.latents
            z = _rows(spec.values, mv, "rows.values", names) if isinstance(spec, Rows) else None
            z = z if z is not None else await self._latents(mv, spec, 0, n)
            result = await self._run(mv, _truncate(z, psi), y, output, deadline, urgent=req.urgent)
            if key is not None:
                self.cache.put(key, result)
            return result

    async def run(self, req: Generate | Infer | Edit, deadline: float | None = None) -> Result:
        """A Generate, an Infer or an Edit, whichever the front end made."""
        if isinstance(req, Edit):
            return await self.edit(req, deadline)
        return await (self.infer(req, deadline) if isinstance(req, Infer) else self.generate(req, deadline))

    async def infer(self, req: Infer, deadline: float | None = None) -> Result:
        """Tensors straight to the model: shapes checked once against the version leased, y passed through."""
        names = req.names
        with self._use(req) as mv:
            output = _check_output(req.output, names)
            spec = mv.spec
            z = _matrix(req.z, spec.latent_dim, "z", names)
            n = len(z)
            if n > self.limits.max_images:
                raise InvalidArgument(f"{names('z')}: {n} rows, the limit per request is {self.limits.max_images}")
            y = req.y
            if not spec.num_classes and y is not None:
                raise InvalidArgument(f"{names('y')}: model {mv.name!r} is unconditional and takes no y")
            if spec.num_classes:
                if y is None:
                    raise InvalidArgument(
                        f"{names('y')}: model {mv.name!r} is conditional: give y [n, {spec.num_classes}]"
                    )
                y = _matrix(y, spec.num_classes, "y", names)
                if len(y) not in (1, n):
                    raise InvalidArgument(f"{names('y')}: {len(y)} rows for {n} samples; give 1 or {n}")
                y = np.ascontiguousarray(np.broadcast_to(y, (n, spec.num_classes)), np.float32)
            self._check_size(mv, n, output, "z", names)
            psi = _truncation(req.truncation, names)
            mv.batcher.check_room(n)
            z = _truncate(np.ascontiguousarray(z, np.float32), psi)
            return await self._run(mv, z, y, output, deadline, urgent=req.urgent)

    def _check_size(self, mv: ModelVersion, n: int, output: Output, path: str, names: Names) -> None:
        size = response_bytes(mv, n, output)
        if size > self.limits.max_message_bytes:
            raise InvalidArgument(
                f"{names(path)}: {n} images of this model make a response of up to {size:,} bytes, over the"
                f" {self.limits.max_message_bytes:,}-byte message limit; ask for fewer{names.hint('stream')}"
            )

    async def stream(self, req: Generate, deadline: float | None = None) -> AsyncIterator[Result]:
        """Chunks of at most `stream_chunk` images, each within half a message; two in flight keep the batcher busy.

        Latents are built chunk by chunk, so that a long stream holds two chunks' worth in memory, not all of it.
        """
        names = req.names
        with self._use(req) as mv:
            output = _check_output(req.output, names)
            if output.grid:
                raise InvalidArgument(f"{names('output.grid')}: not available on a stream")
            n = _count(req.latents, mv.spec.latent_dim, self.limits.max_stream_images, names)
            y = _label_vectors(mv, req.labels, n, self.limits.max_stream_images, names)
            psi = _truncation(req.truncation, names)
            one = response_bytes(mv, 1, output)
            per_image = one - response_bytes(mv, 0, output)
            if one > self.limits.max_message_bytes:
                raise InvalidArgument(
                    f"{names('output')}: one image of this model makes a message of up to {one:,} bytes, over the"
                    f" {self.limits.max_message_bytes:,}-byte message limit"
                )
            chunk = max(1, min(self.limits.stream_chunk, self.limits.max_message_bytes // (2 * per_image)))
            mv.batcher.check_room(min(n, chunk))
            rows = _rows(req.latents.values, mv, "rows.values", names) if isinstance(req.latents, Rows) else None

            async def part(start: int) -> Result:
                stop = min(start + chunk, n)
                z = rows[start:stop] if rows is not None else await self._latents(mv, req.latents, start, stop)
                z = _truncate(z, psi)
                labels = None if y is None else y[start:stop]
                # Admitted at its start: a later piece waits its turn rather than fail half-way on a full queue.
                return await self._run(mv, z, labels, output, deadline, offset=start, admitted=start > 0)

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
                # Collected, so that a sibling's failure is retrieved here rather than reported as never retrieved.
                await asyncio.gather(*pending, return_exceptions=True)

    async def interpolate(self, req: Interpolate, deadline: float | None = None) -> Result:
        with self._use(req) as mv:
            return await self._interpolate(mv, req, deadline)

    async def _interpolate(self, mv: ModelVersion, req: Interpolate, deadline: float | None) -> Result:
        names = req.names
        output = _check_output(req.output, names)
        if req.method not in METHODS:
            raise InvalidArgument(
                f"{names('method')}: unknown value {short(req.method)} (methods: {', '.join(METHODS)})"
            )
        keys = len(req.keyframes)
        if not 2 <= keys <= self.limits.max_images:
            raise InvalidArgument(f"{names('keyframes')}: {keys} given, between 2 and {self.limits.max_images} needed")
        if req.steps < 1:
            raise InvalidArgument(f"{names('steps')}: must be >= 1")
        frames = (keys - 1) * req.steps + 1
        paths = [("keyframes", req.keyframes)]
        paths += [(f"more_paths[{p}].keyframes", path) for p, path in enumerate(req.more_paths)]
        if frames * len(paths) > self.limits.max_images:
            limit = self.limits.max_images
            raise InvalidArgument(
                f"{names('steps')}: {frames * len(paths)} frames requested, the limit per request is {limit}"
            )
        for field, path in paths[1:]:
            if len(path) != keys:  # in step: every path has the first one's frames
                raise InvalidArgument(f"{names(field)}: {len(path)} given, as many as keyframes ({keys}) needed")
        ys = [_keyframe_labels(mv, path, req.steps, names, field) for field, path in paths]
        y = None if ys[0] is None else np.concatenate(ys)
        z = np.concatenate([
            latents.path(_keyframe_latents(mv, path, names, field), req.steps, req.method) for field, path in paths
        ])  # fmt: skip
        z = _truncate(z, _truncation(req.truncation, names))
        if req.animation is not None:
            return await self._animate(mv, req, z, y, len(paths), deadline)
        strip = output if output.grid_columns else dataclasses.replace(output, grid_columns=frames)
        self._check_size(mv, frames * len(paths), strip, "steps", names)
        return await self._run(mv, z, y, strip, deadline)

    async def edit(self, req: Edit, deadline: float | None = None) -> Result:
        names = req.names
        with self._use(req) as mv:
            output = _check_output(req.output, names)
            strengths = _strengths(req.strengths, names)
            d, limit = mv.spec.latent_dim, self.limits.max_images
            rows = _count(req.latents, d, limit, names)
            n = rows * len(strengths)
            if n > limit:
                raise InvalidArgument(
                    f"{names('strengths')}: {rows} latents × {len(strengths)} strengths make {n} images, the limit per"
                    f" request is {limit}"
                )
            y = _label_vectors(mv, req.labels, rows, limit, names)
            along = _direction(mv, req, y, names)
            psi = _truncation(req.truncation, names)
            mv.batcher.check_room(n)
            spec = req.latents
            z = _rows(spec.values, mv, "rows.values", names) if isinstance(spec, Rows) else None
            z = _truncate(z if z is not None else await self._latents(mv, spec, 0, rows), psi)
            with np.errstate(over="ignore", invalid="ignore"):  # a caller's huge vector: refused just below
                z = (z[:, None, :] + strengths[None, :, None] * along[:, None, :]).reshape(n, d)
            _check_finite(z, "vector.values" if req.vector is not None else "strengths", names)
            y = None if y is None else np.repeat(y, len(strengths), 0)
            if req.animation is not None:
                return await self._animate(mv, req, z, y, rows, deadline, "fewer strengths")
            table = output if output.grid_columns else dataclasses.replace(output, grid_columns=len(strengths))
            self._check_size(mv, n, table, "strengths", names)
            return await self._run(mv, z, y, table, deadline, urgent=req.urgent)

    async def invert(self, req: Invert, deadline: float | None = None) -> Inverted:
        """The encoder's z (and class) for each image, then, with `refine`, a search over z with at most that many
        generator passes per image (service/inversion.py), stopped early when the deadline nears."""
        names = req.names
        with self._use(req) as mv:
            if mv.encoder is None:
                why = mv.note or "no encoder.onnx lies beside its model.onnx (`python -m training.encoder` makes one)"
                raise FailedPrecondition(
                    f"{names('model')}: {mv.name!r} version {mv.version} serves no inversion: {why}"
                )
            output = _check_output(req.output, names)
            if output.grid or output.return_latents:
                raise InvalidArgument(f"{names('output')}: grids and latents do not apply to Invert (z is answered)")
            pop = inversion.POPULATION
            if not (req.refine == 0 or pop <= req.refine <= MAX_REFINE):
                raise InvalidArgument(
                    f"{names('refine_passes')}: 0, or from {pop} (one generation of {pop} candidates) to"
                    f" {MAX_REFINE:,} (got {req.refine})"
                )
            targets = await self._targets(mv, req, names)
            n = len(targets)
            if n * req.refine > MAX_REFINE_TOTAL:
                raise InvalidArgument(
                    f"{names('refine_passes')}: {n} images × {req.refine:,} passes is over {MAX_REFINE_TOTAL:,}"
                    " generator passes per request; refine fewer images per call, or with fewer passes"
                )
            self._check_size(mv, n, output, "images", names)
            mv.batcher.check_room(n)
            loop = asyncio.get_running_loop()
            lo, hi = mv.spec.output_range
            x = targets.transpose(0, 3, 1, 2).astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)
            z, logits = await loop.run_in_executor(self.encoder, mv.encoder.run, x)
            labels = probabilities = y = None
            if logits is not None:
                shifted = np.exp(logits - logits.max(1, keepdims=True))
                probabilities = (shifted / shifted.sum(1, keepdims=True)).astype(np.float32)
                labels = probabilities.argmax(1)
                y = np.eye(mv.spec.num_classes, dtype=np.float32)[labels]
            wanted = targets.transpose(0, 3, 1, 2) / 255.0
            priority = HIGH if req.urgent else NORMAL

            async def draw(candidates: np.ndarray, ys: np.ndarray | None) -> np.ndarray:
                """The generator's output, in pieces the queue takes (a generation is n·16 samples)."""
                step = self.limits.max_images
                parts = [mv.run(candidates[i : i + step], None if ys is None else ys[i : i + step], deadline, priority)
                         for i in range(0, len(candidates), step)]  # fmt: skip
                return np.concatenate(await asyncio.gather(*parts))

            def scores(images: np.ndarray, goals: np.ndarray) -> np.ndarray:
                return inversion.distances(np.clip((images - lo) / (hi - lo), 0, 1), goals)

            started = time.monotonic()
            drawn = await draw(z, y)
            one_pass = time.monotonic() - started
            first = scores(drawn, wanted)
            # Each image's search draws from a stream of its own, seeded by its pixels: the same image gets the same
            # answer alone or beside others.
            seeds = [int.from_bytes(hashlib.sha256(t.tobytes()).digest()[:8], "little") for t in targets]
            search = inversion.Search(z, first, seeds)
            ys = None if y is None else np.repeat(y, pop, 0)
            goals = np.repeat(wanted, pop, 0)
            done, started = 0, time.monotonic()
            while done < req.refine // pop:
                # A generation costs what the last ones did (at first, 16 passes of the encoder's z), and the answer
                # one more pass: stop while both still fit before the deadline, with the best so far.
                generation = (time.monotonic() - started) / done if done else pop * one_pass
                if deadline is not None and time.monotonic() + generation + 2 * one_pass > deadline:
                    break
                try:
                    search.tell(scores(await draw(search.ask(), ys), goals))
                except QueueFull:  # others' work fills the queue: answer with what the search has
                    break
                done += 1
            if not search.improved:  # the encoder's z stands: its images are the answer, no pass more
                result = await loop.run_in_executor(self.encoder, _encode_floats, mv, drawn, output)
            else:
                result = await self._run(mv, search.best, y, output, deadline, urgent=req.urgent)
            return Inverted(result, search.best, labels, probabilities, search.best_distance, first, done * pop)

    async def _targets(self, mv: ModelVersion, req: Invert, names: Names) -> np.ndarray:
        """The request's images as uint8 [n, H, W, C] of the model's size: files decoded off the event loop."""
        c, h, w = mv.spec.output_shape
        limit = self.limits.max_images
        if req.images and req.pixels:
            raise InvalidArgument(f"{names('images')}: give image files or raw pixels, not both")
        if req.pixels:
            size = h * w * c
            if len(req.pixels) % size:
                raise InvalidArgument(
                    f"{names('pixels')}: {len(req.pixels):,} bytes is not a whole number of {h}×{w}×{c} images"
                )
            if len(req.pixels) // size > limit:
                raise InvalidArgument(f"{names('pixels')}: {len(req.pixels) // size} images, the limit is {limit}")
            return np.frombuffer(req.pixels, np.uint8).reshape(-1, h, w, c)
        if not req.images:
            raise InvalidArgument(f"{names('images')}: required: image files, or raw pixels")
        if len(req.images) > limit:
            raise InvalidArgument(f"{names('images')}: {len(req.images)} given, the limit per request is {limit}")

        def decode_all() -> np.ndarray:
            out = np.empty((len(req.images), h, w, c), np.uint8)
            for i, data in enumerate(req.images):
                if not data:
                    raise InvalidArgument(f"{names(f'images[{i}]')}: empty")
                try:
                    out[i] = encode.decode(data, (h, w, c))
                except ValueError as e:
                    raise InvalidArgument(f"{names(f'images[{i}]')}: {e}") from None
            return out

        return await asyncio.get_running_loop().run_in_executor(self.encoder, decode_all)

    async def _animate(
        self, mv: ModelVersion, req: Interpolate | Edit, z: np.ndarray, y: np.ndarray | None, paths: int,
        deadline: float | None, fewer: str = "fewer steps",
    ) -> Result:  # fmt: skip
        """The frames as one animated image, encoded off the event loop: z holds `paths` runs of frames (an
        interpolation's; an edit's strengths for one latent), shown side by side, each animation frame a grid of
        their frames at that moment."""
        names, anim = req.names, req.animation
        if anim.format not in encode.ANIMATIONS:
            given = short(anim.format) if anim.format else "required"
            raise InvalidArgument(f"{names('animation.format')}: {given} (formats: {', '.join(encode.ANIMATIONS)})")
        fps = anim.fps or DEFAULT_FPS
        if not (math.isfinite(fps) and MIN_FPS <= fps <= MAX_FPS):
            raise InvalidArgument(
                f"{names('animation.fps')}: from {MIN_FPS} to {MAX_FPS} frames a second (got {fps:g})"
            )
        if not 0 <= anim.loops <= MAX_LOOPS:
            raise InvalidArgument(f"{names('animation.loops')}: from 0 (for ever) to {MAX_LOOPS} (got {anim.loops})")
        result = await self._run(mv, z, y, Output(Format.UINT8), deadline)
        frames = result.pixels
        if paths > 1:  # [path, t] → one grid per moment
            by_path = frames.reshape(paths, -1, *frames.shape[1:])
            columns = req.output.grid_columns or math.ceil(math.sqrt(paths))
            frames = np.stack([encode.grid(by_path[:, t], columns) for t in range(by_path.shape[1])])
        data = await asyncio.get_running_loop().run_in_executor(
            self.encoder, encode.animation, frames, anim.format, fps, anim.ping_pong, anim.loops
        )
        limit = self.limits.max_message_bytes
        if len(data) > limit:
            smaller = fewer + (", or webp, the smallest" if anim.format != "webp" else "")
            raise InvalidArgument(
                f"{names('animation')}: the {anim.format} animation is {len(data):,} bytes, over the {limit:,}-byte"
                f" message limit; ask for {smaller}"
            )
        return dataclasses.replace(
            result, pixels=None, animation=data, animation_type=encode.ANIMATIONS[anim.format][1]
        )

    async def _latents(self, mv: ModelVersion, spec: Seeds | SeedRange, start: int, stop: int) -> np.ndarray:
        """Samples start..stop-1 by the seed contract, [n, latent_dim] float32 (the seeds were checked by _count)."""
        seeds = range(spec.start + start, spec.start + stop) if isinstance(spec, SeedRange) else spec.values[start:stop]
        d, prior = mv.spec.latent_dim, mv.spec.prior
        if len(seeds) <= SEEDS_ON_LOOP:
            return contract.seed_latents(seeds, d, prior)
        return await asyncio.get_running_loop().run_in_executor(self.encoder, contract.seed_latents, seeds, d, prior)

    async def _run(
        self, mv: ModelVersion, z: np.ndarray, y: np.ndarray | None, output: Output, deadline: float | None,
        offset: int = 0, urgent: bool = False, admitted: bool = False,
    ) -> Result:  # fmt: skip
        # Pixels (what every format but FLOAT32 is made of) come converted from the batcher's worker thread.
        pixels = output.format is not Format.FLOAT32
        span = None if self.tracing is None else tracing.current()
        trace = None if span is None else []
        try:
            images = await mv.run(z, y, deadline, HIGH if urgent else NORMAL, admitted, pixels, trace)
        finally:
            if trace:  # what ran, failed runs too; the workers wrote it before the result came back
                self.tracing.ran(span, mv.version, trace)
        started = 0 if span is None else time.time_ns()
        # Raw arrays cost microseconds, and one small PNG little more than the thread hand-off: they are encoded here,
        # and never wait behind big grids in the encoder pool. Other PNGs and grids leave the event loop.
        if not output.grid and (output.format is not Format.PNG or len(images) <= PNGS_ON_LOOP):
            result = _encode(mv, images, output, offset)
        else:
            result = await asyncio.get_running_loop().run_in_executor(self.encoder, _encode, mv, images, output, offset)
        if span is not None:
            self.tracing.encoded(span, started, output.format.name, len(images), output.grid)
        return dataclasses.replace(result, latents=z) if output.return_latents else result


def _cache_key(mv: ModelVersion, req: Generate) -> tuple | None:
    """What a Generate by seeds is a pure function of (None for explicit latents: big keys, rarely repeated)."""
    spec = req.latents
    if isinstance(spec, SeedRange):
        latents: tuple = ("range", spec.start, spec.count)
    elif isinstance(spec, Seeds):
        latents = ("seeds", *spec.values)
    else:
        return None
    # The load, not only the version number: a version unloaded and loaded again may be another file.
    return mv.name, mv.version, mv.load, latents, tuple(req.labels), req.truncation, req.output


def _check_seeds(seeds: Sequence[int], path: str, names: Names) -> None:
    """Every seed in 0..2**64 - 1: at numpy speed when they are, item by item to name the first that is not."""
    try:
        values = np.asarray(seeds)
        valid = values.ndim == 1 and values.dtype.kind in "iu" and (not values.size or values.min() >= 0)
    except (OverflowError, TypeError, ValueError):
        valid = False
    if not valid:
        for i, seed in enumerate(seeds):
            _check_seed(seed, f"{path}[{i}]", names)


def _check_seed(seed: int, path: str, names: Names) -> None:
    """Names resolve only on the way to an error, here and below: a request that is fine never pays for them."""
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed <= contract.MAX_SEED):
        raise InvalidArgument(f"{names(path)}: a seed is an integer in 0..2**64 - 1 (got {short(str(seed))})")


def response_bytes(mv: ModelVersion, n: int, output: Output) -> int:
    """An upper bound of the serialized response for n images: images, grid, latents and protobuf framing."""
    c, h, w = mv.spec.output_shape
    image = {Format.PNG: encode.png_bound(h, w, c), Format.UINT8: c * h * w, Format.FLOAT32: 4 * c * h * w}
    field = 6  # tag + length varint of one bytes or packed field
    size = 128 + len(mv.name)  # model, version, format, image_shape, offset
    if not output.grid_only:
        size += n * (image[output.format] + field)
    if output.grid and n:
        size += encode.png_bound(*encode.grid_shape(n, h, w, c, output.grid_columns or math.ceil(math.sqrt(n)))) + field
    if output.return_latents:
        size += 4 * n * mv.spec.latent_dim + field
    return size


def _check_output(output: Output, names: Names) -> Output:
    if output.grid_columns < 0:
        raise InvalidArgument(f"{names('output.grid_columns')}: must be >= 0 (got {output.grid_columns})")
    if output.grid_only and not output.grid:
        raise InvalidArgument(f"{names('output.grid_only')}: needs {names('output.grid')}")
    return output


def _count(spec: Seeds | SeedRange | Rows | None, latent_dim: int, limit: int, names: Names) -> int:
    """How many samples the request asks for, checked against `limit` before anything is built from it."""
    if spec is None:
        raise InvalidArgument(f"{names('latents')}: give seeds, a seed range or latent rows")
    if isinstance(spec, Rows):
        path, n = "rows.values", _whole_rows(spec.values, latent_dim, "rows.values", names)
    elif isinstance(spec, SeedRange):
        path, n = "seed_range.count", spec.count
        _check_seed(spec.start, "seed_range.start", names)
        if n < 0:
            raise InvalidArgument(f"{names(path)}: must be >= 0 (got {n})")
        if spec.start + spec.count > contract.MAX_SEED + 1:
            raise InvalidArgument(f"{names('seed_range.start')}: the range runs past the largest seed, 2**64 - 1")
    else:
        path, n = "seeds.seeds", len(spec.values)
        if n <= limit:
            _check_seeds(spec.values, path, names)
    if n == 0:
        raise InvalidArgument(f"{names(path)}: empty")
    if n > limit:
        raise InvalidArgument(f"{names(path)}: {n} requested, the limit per request is {limit}")
    return n


def _whole_rows(values: Sequence[float], latent_dim: int, path: str, names: Names) -> int:
    if len(values) == 0 or len(values) % latent_dim:
        raise InvalidArgument(
            f"{names(path)}: {len(values)} values is not a positive multiple of latent_dim {latent_dim}"
        )
    return len(values) // latent_dim


def _rows(values: Sequence[float], mv: ModelVersion, path: str, names: Names) -> np.ndarray:
    """Explicit latents: a flat sequence of whole rows, all finite → float32 [n, latent_dim]."""
    latent_dim = mv.spec.latent_dim
    _whole_rows(values, latent_dim, path, names)
    values = np.asarray(values, dtype=np.float32)
    _check_finite(values, path, names)
    return values.reshape(-1, latent_dim)


def _matrix(array: np.ndarray | None, width: int, name: str, names: Names) -> np.ndarray:
    """A tensor the model takes as is: float32 [n >= 1, width], all finite."""
    if array is None or array.ndim != 2 or array.shape[1] != width or len(array) < 1:
        got = "none" if array is None else list(array.shape)
        raise InvalidArgument(f"{names(name + '.shape')}: input {name!r} is [n, {width}] (got {got})")
    _check_finite(array, name, names)
    return array


def _check_finite(values: np.ndarray, path: str, names: Names) -> None:
    if not np.all(np.isfinite(values)):
        raise InvalidArgument(f"{names(path)}: values must be finite (found NaN or Inf)")


def _truncation(psi: float, names: Names) -> float | None:
    if psi == 0:
        return None
    if not (math.isfinite(psi) and 0 < psi <= 1):
        raise InvalidArgument(f"{names('truncation')}: must be in (0, 1], or 0 for none (got {psi})")
    return psi


def _truncate(z: np.ndarray, psi: float | None) -> np.ndarray:
    return z if psi is None else latents.truncate(z, psi)


def _strengths(strengths: Sequence[float], names: Names) -> np.ndarray:
    if not 1 <= len(strengths) <= MAX_STRENGTHS:
        raise InvalidArgument(f"{names('strengths')}: {len(strengths)} given, from 1 to {MAX_STRENGTHS} needed")
    values = np.asarray(strengths, np.float32)
    if not np.all(np.abs(values) <= MAX_STRENGTH):  # NaN fails too
        raise InvalidArgument(f"{names('strengths')}: each a finite number within ±{MAX_STRENGTH:g}")
    return values


def _direction(mv: ModelVersion, req: Edit, y: np.ndarray | None, names: Names) -> np.ndarray:
    """[rows or 1, latent_dim]: the named direction (for each row's label, if it has a vector per class), or the
    caller's own vector."""
    if req.vector is not None:
        if req.direction:
            raise InvalidArgument(f"{names('direction')}: give a direction or a vector, not both")
        d = mv.spec.latent_dim
        if len(req.vector) != d:
            raise InvalidArgument(f"{names('vector.values')}: exactly one row of {d} values (got {len(req.vector)})")
        return _rows(req.vector, mv, "vector.values", names)
    listed = {d.name: d for d in mv.spec.directions}
    if not req.direction:
        raise InvalidArgument(f"{names('direction')}: required: a direction the model lists, or a vector")
    if not listed:
        raise InvalidArgument(
            f"{names('direction')}: model {mv.name!r} version {mv.version} lists no directions (its file predates"
            " them; `python -m training.directions add` adds them); give a vector"
        )
    if req.direction not in listed:
        known = ", ".join(listed)
        raise InvalidArgument(f"{names('direction')}: unknown direction {short(req.direction)} (directions: {known})")
    return listed[req.direction].along(y)


def _label_vectors(
    mv: ModelVersion, labels: Sequence[Label], n: int, limit: int, names: Names, field: str = "labels"
) -> np.ndarray | None:
    """The float32 [n, num_classes] y input; one label for all samples or one per sample."""
    spec = mv.spec
    if len(labels) > limit:
        raise InvalidArgument(f"{names(field)}: {len(labels)} given, the limit per request is {limit}")
    if not spec.num_classes:
        if labels:
            raise InvalidArgument(f"{names(field)}: model {mv.name!r} is unconditional and takes no labels")
        return None
    if not labels:
        raise InvalidArgument(
            f"{names(field)}: model {mv.name!r} is conditional: give a class index, a name or soft weights"
        )
    if len(labels) not in (1, n):
        raise InvalidArgument(f"{names(field)}: expected 1 or {n} labels for {n} samples, got {len(labels)}")
    rows = np.stack([_label_row(spec.class_names, lab, f"{field}[{i}]", names) for i, lab in enumerate(labels)])
    return np.ascontiguousarray(np.broadcast_to(rows, (n, spec.num_classes)), dtype=np.float32)


def _label_row(class_names: tuple[str, ...], label: Label, field: str, names: Names) -> np.ndarray:
    nc = len(class_names)
    row = np.zeros(nc, np.float32)
    if label.soft is not None:
        w = np.asarray(label.soft, np.float64)
        if len(w) != nc:
            raise InvalidArgument(f"{names(field + '.soft')}: expected {nc} weights, got {len(w)}")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise InvalidArgument(f"{names(field + '.soft')}: weights must be finite, non-negative and not all zero")
        return (w / w.sum()).astype(np.float32)
    if label.name is not None:
        if label.name not in class_names:
            raise InvalidArgument(
                f"{names(field + '.name')}: unknown class {short(label.name)} (classes: {', '.join(class_names)})"
            )
        row[class_names.index(label.name)] = 1
        return row
    if label.index is None:
        raise InvalidArgument(f"{names(field)}: give an index, a name or soft weights")
    if not 0 <= label.index < nc:
        raise InvalidArgument(f"{names(field + '.index')}: unknown class {label.index} (the model has {nc} classes)")
    row[label.index] = 1
    return row


def _keyframe_latents(
    mv: ModelVersion, keyframes: Sequence[Keyframe], names: Names, field: str = "keyframes"
) -> np.ndarray:
    """[k, latent_dim]: each keyframe's seed by the seed contract, or its one explicit row."""
    d = mv.spec.latent_dim
    keys = []
    for i, key in enumerate(keyframes):
        if (key.seed is None) == (key.row is None):
            raise InvalidArgument(f"{names(f'{field}[{i}]')}: give a seed or a row")
        if key.row is None:
            _check_seed(key.seed, f"{field}[{i}].seed", names)
            keys.append(contract.seed_latent(key.seed, d, mv.spec.prior))
            continue
        path = f"{field}[{i}].row.values"
        if len(key.row) != d:
            raise InvalidArgument(f"{names(path)}: exactly one row of {d} values (got {len(key.row)})")
        keys.append(_rows(key.row, mv, path, names)[0])
    return np.stack(keys)


def _keyframe_labels(
    mv: ModelVersion, keyframes: Sequence[Keyframe], steps: int, names: Names, field: str = "keyframes"
) -> np.ndarray | None:
    """Labels at the keyframes, blended linearly between them (soft labels between classes)."""
    given = [key.label for key in keyframes if key.label is not None]
    if not given:
        if mv.spec.num_classes:
            raise InvalidArgument(f"{names(field)}: every keyframe of conditional model {mv.name!r} needs a label")
        return None
    if not mv.spec.num_classes:
        raise InvalidArgument(f"{names(f'{field}.label')}: model {mv.name!r} is unconditional and takes no labels")
    if len(given) != len(keyframes):
        raise InvalidArgument(f"{names(f'{field}.label')}: give a label for every keyframe or for none")
    y_keys = _label_vectors(mv, given, len(given), len(given), names, field=f"{field}.label")
    return latents.path(y_keys, steps, "lerp")


def _encode_floats(mv: ModelVersion, images: np.ndarray, output: Output) -> Result:
    """_encode of the model's own float output [n, C, H, W], whatever the format asks."""
    pixels = images if output.format is Format.FLOAT32 else encode.to_uint8(images, mv.spec.output_range)
    return _encode(mv, pixels, output, 0)


def _encode(mv: ModelVersion, images: np.ndarray, output: Output, offset: int) -> Result:
    """PNG files and an optional grid, or the images as an array. `images` are uint8 pixels [n, H, W, C] for every
    format but FLOAT32, and the model's output [n, C, H, W] for FLOAT32 (converted here only for a grid)."""
    c, h, w = mv.spec.output_shape
    fmt = output.format
    pixels = images if fmt is not Format.FLOAT32 else None
    if fmt is Format.FLOAT32 and output.grid:
        pixels = encode.to_uint8(images, mv.spec.output_range)
    grid_png = b""
    if output.grid:
        grid_png = encode.png(encode.grid(pixels, output.grid_columns or math.ceil(math.sqrt(len(pixels)))))
    array, pngs = None, []
    if output.grid_only:
        pass
    elif fmt is Format.FLOAT32:
        array = np.ascontiguousarray(images, dtype="<f4")
    elif fmt is Format.UINT8:
        array = pixels
    else:
        pngs = [encode.png(p) for p in pixels]
    shape = (c, h, w) if fmt is Format.FLOAT32 else (h, w, c)
    return Result(mv.name, mv.version, fmt, array, pngs, grid_png, offset=offset, image_shape=shape)
