"""Dynamic batching: coalesce concurrent requests into `run_batch` calls on worker threads (asyncio + numpy)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.config import BatchingConfig
from service.errors import DeadlineExceeded, QueueFull, Unavailable

log = logging.getLogger(__name__)

RunBatch = Callable[[dict[str, np.ndarray]], np.ndarray]
Convert = Callable[[np.ndarray], np.ndarray]
# What the service spends per batch besides run_batch (taking, concatenating, waking the loop, answering, metrics),
# measured on a 2-core CPU machine: 64-image requests split into batches of 8 cost 26 µs more per image than whole
# (bench/README.md, P5), about 210 µs per extra batch, on top of the ~100 µs a batch costs the batcher alone.
# choose_batch_size weighs it against the run time saved per sample by a bigger batch.
PER_BATCH_OVERHEAD = 300e-6
# A larger batch must be this much cheaper per sample to be formed. What the profile does not see makes larger
# batches dearer: a closed loop of callers then waits in waves (bench/README.md: DCGAN, 16-image requests,
# 8 callers on 2 cores: batches of 64 gave 0.87x the throughput of 16 and 32, whose profiles were within 5 %).
SIZE_TOLERANCE = 0.10
# Priority levels (OIP's `priority` parameter): HIGH requests are taken before any NORMAL one.
HIGH, NORMAL = 0, 1


class BatchObserver(Protocol):
    """Metrics hooks, called on worker threads and the event loop, some under the queue's lock: keep them cheap,
    thread-safe and non-blocking (prometheus_client's are)."""

    def queue_wait(self, seconds: float) -> None:
        """Once per request chunk when it is taken into a batch: seconds since it was queued."""

    def batch(self, size: int, run_seconds: float) -> None:
        """Once per successful run_batch call: samples in it and seconds to assemble and run it."""

    def depth(self, samples: int) -> None:
        """Queued samples, whenever that number changes."""


@dataclass(frozen=True)
class Timing:
    """One chunk of a traced request through the batcher, on its clock (seconds): queued, taken into a batch, back
    from run_batch (or failed), and its batch's rows converted to pixels (`done` == `ran` when none asked)."""

    queued: float
    taken: float
    ran: float
    done: float
    samples: int  # this chunk's samples
    batch_size: int  # samples in the batch it ran in
    batch_requests: int  # chunks in that batch
    batch: int  # an identifier the chunks of one batch share
    failed: bool = False


class _NoObserver(BatchObserver):
    """The default: every hook is the protocol's no-op."""


class _Shielded:
    """Forwards to an observer; a hook that raises is logged (once per hook), never fails a request or a worker."""

    def __init__(self, observer: BatchObserver):
        self._observer = observer
        self._failed: set[str] = set()

    def queue_wait(self, seconds: float) -> None:
        self._call("queue_wait", seconds)

    def batch(self, size: int, run_seconds: float) -> None:
        self._call("batch", size, run_seconds)

    def depth(self, samples: int) -> None:
        self._call("depth", samples)

    def _call(self, hook: str, *args: float) -> None:
        try:
            getattr(self._observer, hook)(*args)
        except Exception:  # metrics are not worth a request; the log says what broke
            if hook not in self._failed:
                self._failed.add(hook)
                log.exception("batch observer hook %s failed; further failures of it are not logged", hook)


@dataclass(eq=False)
class _Request:
    future: asyncio.Future[np.ndarray]
    parts: list[np.ndarray | None]  # output rows per chunk, filled as batches finish
    pending: int  # chunks still without output
    chunks: deque[_Chunk] = field(default_factory=deque)  # queued, not yet taken
    priority: int = NORMAL
    pixels: bool = False  # wants its rows through the batcher's `pixels` conversion
    served: int = 0  # samples taken into batches so far: the scheduling key (least served first)
    seq: int = 0  # arrival order, the tie-break
    trace: list[Timing] | None = None  # where its chunks' timings go, when it is traced


@dataclass(eq=False)
class _Chunk:
    request: _Request
    index: int  # position among its request's chunks
    inputs: dict[str, np.ndarray]
    size: int
    queued_at: float
    deadline: float | None


def choose_batch_size(
    seconds: dict[int, float], overhead: float = PER_BATCH_OVERHEAD, tolerance: float = SIZE_TOLERANCE
) -> int:
    """The batch size to form, from measured run times: the smallest within `tolerance` of the best cost per sample.

    `seconds` maps batch sizes to one run's time; each run also pays `overhead` (the service's own work per batch).
    On a CPU the cost per sample stops falling at a small batch and then rises (caches); on a GPU it falls to the
    largest size. Smaller batches keep every worker busy and cost callers less waiting, so ties go to them.
    """
    if not seconds:
        raise ValueError("no timings to choose a batch size from")
    cost = {size: (t + overhead) / size for size, t in seconds.items()}
    best = min(cost.values())
    return min(size for size, c in cost.items() if c <= best * (1 + tolerance))


class Batcher:
    """Queues request chunks and runs them through `run_batch` in batches of at most `batch_size` samples.

    Each worker is a thread of its own that forms its next batch from the queue as soon as it is free, and hands the
    result back to the event loop with one call_soon_threadsafe: the loop never waits on a worker.

    Scheduling is fair between big and small work: batches are filled from the requests that have been served least
    so far (HIGH priority before NORMAL, then arrival order), one chunk at a time. A request that arrives behind a big
    one waits for at most the batches already running, not for every piece of the big one. The price: a big request
    advances only when no less-served request is queued, so under a sustained overload of small requests it waits
    (its deadline bounds how long).
    """

    def __init__(
        self,
        run_batch: RunBatch,
        config: BatchingConfig,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        batch_size: int = 0,
        max_piece: int = 0,
        pixels: Convert | None = None,
    ) -> None:
        self.config = config
        # The size batches are formed at (and requests split at): measured by the runtime, else the maximum.
        self.batch_size = min(batch_size or config.max_batch_size, config.max_batch_size)
        # The biggest piece of a split request (0: the maximum): the registry sizes it to a few ms of model time.
        self.max_piece = max_piece or config.max_batch_size
        # Model output → what a request that asks for `pixels` gets (uint8 images), once per batch on the worker:
        # on the event loop, numpy would drop and retake the GIL for every request (measured: a quarter of a
        # 1-image request's CPU).
        self._pixels = pixels
        self.workers = config.workers or 1
        self._run_batch = run_batch
        self._observer = _Shielded(observer or _NoObserver())
        self._clock = clock
        self._cv = threading.Condition()  # guards everything below; workers wait on it
        # Requests with queued chunks, keyed (priority, served, seq); a request leaves when its last chunk is taken.
        # A dropped request (cancelled, failed) stays until it reaches the top and is skipped there.
        self._heap: list[tuple[int, int, int, _Request]] = []
        self._seq = itertools.count()
        self._depth = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._accepting = False
        self._closing = False
        self._running = 0  # batches in run_batch now (adaptive delay)
        self._concurrent = False  # did the last batch show requests arriving together? (adaptive delay)
        self._idle = 0  # workers waiting for work with no timeout: the ones submit() must wake
        self._traced_batches = itertools.count()  # Timing.batch

    @property
    def accepting(self) -> bool:
        """Started and not draining."""
        return self._accepting

    @property
    def queue_depth(self) -> int:
        """Samples queued and not yet taken into a batch."""
        return self._depth

    async def start(self) -> None:
        """Start the worker threads, which answer on the running loop, and start accepting requests."""
        if self._threads or self._closing:
            raise RuntimeError("a Batcher can be started only once")
        self._loop = asyncio.get_running_loop()
        self._threads = [
            threading.Thread(target=self._work, name=f"batcher-{i}", daemon=True) for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()
        self._accepting = True

    def check_room(self, n: int, admitted: bool = False) -> None:
        """Raise what submit() would for n samples now: Unavailable when not accepting, QueueFull when full (never
        for an `admitted` request)."""
        if not self._accepting:
            raise Unavailable("batcher is not accepting requests (not started, or draining)")
        if not admitted and self._depth + n > self.config.max_queue:
            raise QueueFull(
                f"batch queue is full: {self._depth} of {self.config.max_queue} samples queued, request has {n}"
            )

    async def submit(
        self, inputs: dict[str, np.ndarray], deadline: float | None = None, priority: int = NORMAL,
        admitted: bool = False, pixels: bool = False, trace: list[Timing] | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Run `inputs` (arrays sharing a leading axis n >= 1) in batches; returns this request's n rows in order.

        Raises Unavailable if not started or stopping, QueueFull if the queue cannot take n more samples (unless
        `admitted`: a later piece of a stream that was admitted when it began waits its turn instead of failing
        half-way; a stream has at most two pieces queued, so the queue overruns by at most that per stream),
        DeadlineExceeded if `deadline` (a clock() value) passed before a chunk was taken, or run_batch's exception.
        With `pixels`, the rows come through the batcher's `pixels` conversion. With `trace`, a Timing per chunk
        that ran is appended to it (on a worker thread, before the result is handed back).
        The caller must not mutate `inputs` until this returns: chunks are views into them.
        """
        n = _leading_length(inputs)
        # Unlike Triton we split oversized requests: one large request neither exceeds what the model was sized
        # for nor runs on a single worker while the others idle. Into no more pieces than there are workers (each
        # extra batch costs the service time, bench/README.md), none smaller than the formed size, and none longer
        # to run than max_piece allows (a small request arriving meanwhile waits for one piece at most). Batching
        # off: every request runs alone, split only at the maximum.
        cfg = self.config
        piece = max(self.batch_size, -(-n // self.workers)) if cfg.enabled else cfg.max_batch_size
        piece = min(piece, cfg.max_batch_size, max(self.max_piece, self.batch_size))
        starts = range(0, n, piece)
        request = _Request(asyncio.get_running_loop().create_future(), [None] * len(starts), len(starts))
        request.priority = HIGH if priority == HIGH else NORMAL
        if pixels and self._pixels is None:
            raise ValueError("pixels asked of a batcher that has no pixels conversion")
        request.pixels, request.trace = pixels, trace
        with self._cv:
            self.check_room(n, admitted)
            now = self._clock()
            before = self._depth
            for index, lo in enumerate(starts):
                hi = min(lo + piece, n)
                chunk_inputs = {name: array[lo:hi] for name, array in inputs.items()}
                request.chunks.append(_Chunk(request, index, chunk_inputs, hi - lo, now, deadline))
            request.seq = next(self._seq)
            heapq.heappush(self._heap, (request.priority, 0, request.seq, request))
            self._depth += n
            self._observer.depth(self._depth)
            # Wake a worker only when this changes what one would do: work where there was none (an idle one), or
            # a batch now full (one waiting out the delay, too). A busy worker looks at the queue when it is done;
            # waking workers on every request costs the event loop the GIL, twice, per request.
            if (self._idle and not before) or before < self.batch_size <= self._depth or len(starts) > 1:
                self._cv.notify(len(starts))
        try:
            return await request.future
        except asyncio.CancelledError:
            # The caller gave up: its chunks that have not run yet should cost nothing.
            with self._cv:
                self._discard(request)
            raise

    async def stop(self) -> None:
        """Stop accepting (submit raises Unavailable), run everything already queued, then end the workers."""
        with self._cv:
            self._accepting = False
            self._closing = True
            self._cv.notify_all()
        loop = asyncio.get_running_loop()
        for thread in self._threads:
            await loop.run_in_executor(None, thread.join)
        # A worker's last answers were scheduled before it ended: let them run before returning.
        await asyncio.sleep(0)

    # ---- worker threads ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cv:
                while True:
                    wait = self._seconds_until_ready()
                    if wait == 0:
                        batch, expired = self._take()
                        if batch or expired:
                            break
                        continue
                    if wait is None and self._closing:
                        return
                    self._idle += wait is None
                    self._cv.wait(wait)
                    self._idle -= wait is None
                self._running += bool(batch)
                if self._depth:  # more than this batch is waiting: another worker may take it
                    self._cv.notify()
            if expired:
                self._answer(self._expire, expired)
            if batch:
                result, seconds = self._call(batch)
                with self._cv:
                    self._running -= 1
                if not isinstance(result, Exception):
                    self._observer.batch(sum(chunk.size for chunk in batch), seconds)
                self._answer(self._deliver, batch, result)

    def _answer(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed without stop(): nobody is left to answer
            log.warning("batcher: the event loop closed before a batch was answered (stop() was never awaited)")

    def _top(self) -> _Request | None:
        """Under the lock: the request to serve next, dropped ones cleared off the top."""
        heap = self._heap
        while heap and not heap[0][3].chunks:
            heapq.heappop(heap)
        return heap[0][3] if heap else None

    def _seconds_until_ready(self) -> float | None:
        """0: take a batch now; None: nothing queued; else seconds until the next chunk's delay ends."""
        top = self._top()
        if top is None:
            return None
        cfg = self.config
        if self._closing or not cfg.enabled or self._depth >= self.batch_size:
            return 0.0
        # Adaptive delay: wait for company only while requests are arriving together (the last batch held several
        # chunks, or more were queued meanwhile) or the model is busy anyway. A lone caller never pays it.
        if cfg.adaptive and not (self._concurrent or self._running):
            return 0.0
        return max(0.0, top.chunks[0].queued_at + cfg.max_delay_ms / 1000 - self._clock())

    def _take(self) -> tuple[list[_Chunk], list[tuple[_Chunk, float]]]:
        """Under the lock: the next batch, up to batch_size samples, a chunk at a time from the least-served
        request; and the chunks past their deadline (with how long they waited), whose requests fail instead."""
        now = self._clock()
        cfg = self.config
        before = self._depth
        batch: list[_Chunk] = []
        expired: list[tuple[_Chunk, float]] = []
        size = 0
        # A chunk larger than the formed size (a request split among the workers) runs as a batch of its own; no
        # chunk is skipped for a smaller one behind it, so none can starve at its level.
        while (request := self._top()) is not None and (not batch or size + request.chunks[0].size <= self.batch_size):
            heapq.heappop(self._heap)
            if request.future.done():  # cancelled, but the submit() task has not run its own cleanup yet
                self._discard(request)
                continue
            chunk = request.chunks.popleft()
            self._depth -= chunk.size
            if chunk.deadline is not None and now >= chunk.deadline:
                expired.append((chunk, now - chunk.queued_at))
                self._depth -= sum(c.size for c in request.chunks)  # the request fails: its other chunks go too
                request.chunks.clear()
                continue
            batch.append(chunk)
            size += chunk.size
            self._observer.queue_wait(now - chunk.queued_at)
            request.served += chunk.size
            if request.chunks:
                heapq.heappush(self._heap, (request.priority, request.served, request.seq, request))
            if not cfg.enabled:
                break
        if self._depth != before:
            self._observer.depth(self._depth)
        if batch:
            self._concurrent = len(batch) > 1 or self._depth > 0
        return batch, expired

    def _call(self, batch: list[_Chunk]) -> tuple[tuple[np.ndarray, np.ndarray | None] | Exception, float]:
        """Concatenate, run and time the batch, and convert it where a request wants pixels: (output, pixels or
        None); an error is returned for the batch's requests."""
        size = sum(chunk.size for chunk in batch)
        start = self._clock()
        ran = None
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = {name: np.concatenate([c.inputs[name] for c in batch]) for name in batch[0].inputs}
            output = np.asarray(self._run_batch(inputs))
            ran = self._clock()
            if output.ndim == 0 or len(output) != size:
                raise RuntimeError(f"run_batch returned shape {output.shape} for a batch of {size} samples")
            seconds = ran - start
            pixels = self._pixels(output) if any(c.request.pixels for c in batch) else None
        except Exception as exc:  # belongs to this batch's requests only; the worker keeps serving
            seconds = self._clock() - start
            self._trace(batch, start, start + seconds, start + seconds, size, failed=True)
            return exc, seconds
        self._trace(batch, start, ran, None if pixels is not None else ran, size)
        return (output, pixels), seconds

    def _trace(self, batch: list[_Chunk], start: float, ran: float, done: float | None, size: int,
               failed: bool = False) -> None:  # fmt: skip
        """A Timing for each chunk of a traced request in the batch; nothing else when none is traced."""
        number = None
        for chunk in batch:
            trace = chunk.request.trace
            if trace is None:
                continue
            if number is None:
                number, done = next(self._traced_batches), self._clock() if done is None else done
            trace.append(Timing(chunk.queued_at, start, ran, done, chunk.size, size, len(batch), number, failed))

    # ---- on the event loop ---------------------------------------------------------------------------

    def _deliver(self, batch: list[_Chunk], result: tuple[np.ndarray, np.ndarray | None] | Exception) -> None:
        if isinstance(result, Exception):
            for chunk in batch:
                self._fail(chunk.request, result)
            return
        output, pixels = result
        offset = 0
        for chunk in batch:
            request = chunk.request
            if request.future.done():  # cancelled or failed meanwhile: nobody takes these rows
                offset += chunk.size
                continue
            rows = pixels if request.pixels else output
            request.parts[chunk.index] = rows[offset : offset + chunk.size]
            offset += chunk.size
            request.pending -= 1
            if request.pending == 0 and not request.future.done():
                parts = request.parts
                request.future.set_result(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def _expire(self, expired: list[tuple[_Chunk, float]]) -> None:
        for chunk, waited in expired:
            self._fail(chunk.request, DeadlineExceeded(f"deadline passed after {waited:.3f} s in the batch queue"))

    def _fail(self, request: _Request, exc: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
        if request.chunks:
            with self._cv:
                self._discard(request)  # its other chunks would only produce rows nobody can receive

    def _discard(self, request: _Request) -> None:
        """Under the lock: drop the request's queued chunks (its heap entry is skipped when it reaches the top)."""
        request.parts = [None] * len(request.parts)  # what it already got is freed now, not when its entry leaves
        removed = sum(c.size for c in request.chunks)
        if removed:
            request.chunks.clear()
            self._depth -= removed
            self._observer.depth(self._depth)


def _leading_length(inputs: dict[str, np.ndarray]) -> int:
    """The shared length n >= 1 of the arrays' first axis."""
    lengths = {name: len(array) if getattr(array, "ndim", 0) else 0 for name, array in inputs.items()}
    n = next(iter(lengths.values()), 0)
    if n < 1 or any(length != n for length in lengths.values()):
        raise ValueError(f"inputs must be arrays sharing a leading axis of length >= 1, got lengths {lengths}")
    return n
