"""A closed-loop load driver for the Generator service, for soak runs and fault tests.

    stop = asyncio.Event()
    tally = Tally()
    task = asyncio.create_task(closed_loop(channel, [Target("mnist-cdcgan", classes=10)], 8, stop, tally=tally))
    ...  # reload, kill, drain; watch tally.first_seen(...) meanwhile
    stop.set()
    await task
    assert not tally.failures()

Each caller sends one call at a time until `stop` is set; calls pick a method from the mix and a target with a
seeded RNG per caller, so every caller's sequence of requests is the same from run to run (how the callers
interleave is not). Every call is recorded as a `Call`; `Tally` answers the usual questions about them.
Imports only grpc and the stubs, so a test pays little to import it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc

METHODS = ("Generate", "GenerateStream", "Interpolate")
CHECK_FAILED = "CHECK_FAILED"  # the counts() key of calls that ended OK but answered wrongly

Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Target:
    """A model to call: `version` 0 asks for the latest; `classes` > 0 sends labels (conditional models)."""

    model: str
    version: int = 0
    classes: int = 0


@dataclass(frozen=True)
class Shape:
    """How big each call is: images per Generate and GenerateStream call, frames per Interpolate call."""

    images: int = 2
    stream_images: int = 6
    steps: int = 2  # Interpolate: two keyframes, `steps` frames between them plus the last, so steps + 1 frames

    def expected(self, method: str) -> int:
        return {"Generate": self.images, "GenerateStream": self.stream_images, "Interpolate": self.steps + 1}[method]


DEFAULT_SHAPE = Shape()


@dataclass
class Call:
    """One finished call. Times are time.monotonic() seconds; `version` 0 when no response arrived."""

    method: str
    model: str
    requested: int  # the version asked for; 0 = latest
    version: int  # the version that answered (the last chunk's, for streams)
    code: grpc.StatusCode
    details: str  # gRPC's status details, or what a client-side check found wrong
    start: float
    end: float
    images: int  # images received, including those of a stream that failed later
    check: str = ""  # non-empty when the call ended OK but the answer was wrong (image count, mixed versions)

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK and not self.check


@dataclass(frozen=True)
class Window:
    """Calls that ended in [start, end) seconds after the tally's origin (the last window may be shorter)."""

    start: float
    end: float
    completed: int  # OK calls
    images: int  # images of OK calls
    failed: int
    versions: Counter  # (model, version) → OK calls answered by it

    @property
    def calls_per_s(self) -> float:
        return self.completed / (self.end - self.start)

    @property
    def images_per_s(self) -> float:
        return self.images / (self.end - self.start)


@dataclass
class Tally:
    """Every call of a run, in the order they ended; `origin` is the monotonic time windows count from."""

    calls: list[Call] = field(default_factory=list)
    origin: float = field(default_factory=time.monotonic)

    def counts(self) -> Counter:
        """Calls by status code name; OK calls that failed a client-side check count as CHECK_FAILED."""
        return Counter(CHECK_FAILED if c.check else c.code.name for c in self.calls)

    def failures(self) -> list[Call]:
        return [c for c in self.calls if not c.ok]

    def completed(self, since: float = float("-inf")) -> int:
        """OK calls that ended at or after monotonic time `since`."""
        return sum(c.ok and c.end >= since for c in self.calls)

    def windows(self, width: float, until: float | None = None) -> list[Window]:
        """Consecutive windows of `width` seconds from the origin to `until` (default: the last call's end)."""
        until = until if until is not None else max((c.end for c in self.calls), default=self.origin)
        n = max(1, int(-(-(until - self.origin) // width)))
        out = [[0, 0, 0, Counter()] for _ in range(n)]
        for c in self.calls:
            i = int((c.end - self.origin) // width)
            if not 0 <= i < n:
                continue
            if c.ok:
                out[i][0] += 1
                out[i][1] += c.images
                out[i][3][c.model, c.version] += 1
            else:
                out[i][2] += 1
        last = until - self.origin
        return [Window(i * width, min((i + 1) * width, last), *w) for i, w in enumerate(out)]

    def first_seen(self, model: str) -> dict[int, float]:
        """Version → the earliest end of an OK latest-version (0) call to `model` that it answered."""
        seen: dict[int, float] = {}
        for c in self.calls:
            if c.ok and c.model == model and c.requested == 0:
                seen[c.version] = min(seen.get(c.version, c.end), c.end)
        return seen

    def last_sent(self, model: str) -> dict[int, float]:
        """Version → the latest start of an OK latest-version (0) call to `model` that it answered.

        After a switch from N to N+1 at time T, last_sent(model)[N] <= T + the switch's allowance says that no
        request sent later than that was still routed to N.
        """
        sent: dict[int, float] = {}
        for c in self.calls:
            if c.ok and c.model == model and c.requested == 0:
                sent[c.version] = max(sent.get(c.version, c.start), c.start)
        return sent


def _labels(rng: random.Random, target: Target, n: int) -> list[pb.Label]:
    return [pb.Label(index=rng.randrange(target.classes)) for _ in range(n)] if target.classes else []


def _generate(rng: random.Random, target: Target, n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=target.model,
        version=target.version,
        seed_range=pb.SeedRange(start=rng.randrange(1 << 32), count=n),
        labels=_labels(rng, target, 1),
        output=pb.OutputOptions(format=pb.RAW_UINT8),
    )


def _interpolate(rng: random.Random, target: Target, steps: int) -> pb.InterpolateRequest:
    keys = [pb.Keyframe(seed=rng.randrange(1 << 32)) for _ in range(2)]
    if target.classes:
        for key in keys:
            key.label.index = rng.randrange(target.classes)
    return pb.InterpolateRequest(
        model=target.model,
        version=target.version,
        keyframes=keys,
        steps=steps,
        output=pb.OutputOptions(format=pb.RAW_UINT8),
    )


async def call_once(
    stub: pb_grpc.GeneratorStub,
    method: str,
    target: Target,
    rng: random.Random,
    shape: Shape = DEFAULT_SHAPE,
    timeout: float = 10.0,
    metadata: Metadata = (),
) -> Call:
    """Send one call and record it; gRPC errors become the call's code and details, never an exception."""
    version, images, versions = 0, 0, set()
    code, details = grpc.StatusCode.OK, ""
    start = time.monotonic()
    try:
        if method == "Generate":
            r = await stub.Generate(_generate(rng, target, shape.images), timeout=timeout, metadata=metadata)
            version, images = r.version, len(r.images)
        elif method == "GenerateStream":
            stream = stub.GenerateStream(
                _generate(rng, target, shape.stream_images), timeout=timeout, metadata=metadata
            )
            async for r in stream:
                version, images = r.version, images + len(r.images)
                versions.add(r.version)
        elif method == "Interpolate":
            r = await stub.Interpolate(_interpolate(rng, target, shape.steps), timeout=timeout, metadata=metadata)
            version, images = r.version, len(r.images)
        else:
            raise ValueError(f"method: one of {', '.join(METHODS)}, not {method!r}")
    except grpc.aio.AioRpcError as e:
        code, details = e.code(), e.details() or ""
    end = time.monotonic()
    check = ""
    if code == grpc.StatusCode.OK:
        if images != shape.expected(method):
            check = f"{images} images, expected {shape.expected(method)}"
        elif len(versions) > 1:
            check = f"one stream answered by versions {sorted(versions)}"
        elif target.version and version != target.version:
            check = f"version {target.version} asked for, {version} answered"
    return Call(method, target.model, target.version, version, code, check or details, start, end, images, check)


async def closed_loop(
    channel: grpc.aio.Channel,
    targets: Sequence[Target],
    concurrency: int,
    stop: asyncio.Event,
    *,
    methods: Sequence[str] = METHODS,
    shape: Shape = DEFAULT_SHAPE,
    timeout: float = 10.0,
    metadata: Metadata | Callable[[], Metadata] = (),
    seed: int = 0,
    tally: Tally | None = None,
) -> Tally:
    """`concurrency` callers, one call at a time each, until `stop` is set; returns the tally (or fills `tally`).

    Caller i draws its method and target from random.Random(seed · 1,000,003 + i). `metadata` goes with every
    call; a callable is asked anew for each call (a token that rotates). A call in flight when `stop` is set
    finishes and is recorded; none starts after.
    """
    if not targets or not methods or concurrency < 1:
        raise ValueError("closed_loop needs a target, a method and concurrency >= 1")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods: unknown {sorted(unknown)} (known: {', '.join(METHODS)})")
    tally = tally if tally is not None else Tally()
    stub = pb_grpc.GeneratorStub(channel)

    async def caller(i: int) -> None:
        rng = random.Random(seed * 1_000_003 + i)
        while not stop.is_set():
            method, target = rng.choice(methods), rng.choice(targets)
            md = metadata() if callable(metadata) else metadata
            tally.calls.append(await call_once(stub, method, target, rng, shape, timeout, md))

    tasks = [asyncio.create_task(caller(i)) for i in range(concurrency)]
    try:
        await asyncio.gather(*tasks)
    finally:  # one caller's bug (not a gRPC error: those are recorded) must not leave the others running
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return tally


async def discover(channel: grpc.aio.Channel, metadata: Metadata = ()) -> list[Target]:
    """A latest-version target for every model the server lists, with its class count."""
    models = (await pb_grpc.GeneratorStub(channel).ListModels(pb.ListModelsRequest(), metadata=metadata)).models
    return [Target(m.name, 0, len(m.class_names)) for m in models]
