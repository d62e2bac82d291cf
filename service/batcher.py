"""Dynamic batching: coalesce concurrent requests into `run_batch` calls on worker threads (asyncio + numpy)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.config import BatchingConfig
from service.errors import DeadlineExceeded, QueueFull, Unavailable

log = logging.getLogger(__name__)

RunBatch = Callable[[dict[str, np.ndarray]], np.ndarray]


class BatchObserver(Protocol):
    """Metrics hooks, called on the event loop: keep them cheap and non-blocking."""

    def queue_wait(self, seconds: float) -> None:
        """Once per request chunk when it is taken into a batch: seconds since it was queued."""

    def batch(self, size: int, run_seconds: float) -> None:
        """Once per successful run_batch call: samples in it and seconds to assemble and run it."""

    def depth(self, samples: int) -> None:
        """Queued samples, whenever that number changes."""


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


@dataclass(eq=False)
class _Chunk:
    request: _Request
    index: int  # position among its request's chunks
    inputs: dict[str, np.ndarray]
    size: int
    queued_at: float
    deadline: float | None


class Batcher:
    """Queues request chunks and runs them through `run_batch` in batches of at most `max_batch_size` samples."""

    def __init__(
        self,
        run_batch: RunBatch,
        config: BatchingConfig,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._run_batch = run_batch
        self._observer = _Shielded(observer or _NoObserver())
        self._clock = clock
        self._queue: deque[_Chunk] = deque()  # FIFO, so the head is always the oldest chunk
        self._depth = 0
        self._wakeup: asyncio.Event | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._accepting = False
        self._closing = False
        self._concurrent = False  # did the last batch show requests arriving together? (adaptive delay)

    @property
    def accepting(self) -> bool:
        """Started and not draining."""
        return self._accepting

    @property
    def queue_depth(self) -> int:
        """Samples queued and not yet taken into a batch."""
        return self._depth

    async def start(self) -> None:
        """Create the worker tasks on the running loop and start accepting requests."""
        if self._tasks or self._closing:
            raise RuntimeError("a Batcher can be started only once")
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(self.config.workers, thread_name_prefix="batcher")
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.config.workers)]
        self._accepting = True

    def check_room(self, n: int) -> None:
        """Raise what submit() would for n samples now: Unavailable when not accepting, QueueFull when full."""
        if not self._accepting or self._wakeup is None:
            raise Unavailable("batcher is not accepting requests (not started, or draining)")
        if self._depth + n > self.config.max_queue:
            raise QueueFull(
                f"batch queue is full: {self._depth} of {self.config.max_queue} samples queued, request has {n}"
            )

    async def submit(self, inputs: dict[str, np.ndarray], deadline: float | None = None) -> np.ndarray:
        """Run `inputs` (arrays sharing a leading axis n >= 1) in batches; returns this request's n rows in order.

        Raises Unavailable if not started or stopping, QueueFull if the queue cannot take n more samples,
        DeadlineExceeded if `deadline` (a clock() value) passed before a chunk was taken, or run_batch's exception.
        The caller must not mutate `inputs` until this returns: chunks are views into them.
        """
        n = _leading_length(inputs)
        self.check_room(n)
        cfg = self.config
        assert self._wakeup is not None
        now = self._clock()
        # Unlike Triton we split oversized requests, so one large request cannot exceed what the model was sized for.
        starts = range(0, n, cfg.max_batch_size)
        request = _Request(asyncio.get_running_loop().create_future(), [None] * len(starts), len(starts))
        for index, lo in enumerate(starts):
            hi = min(lo + cfg.max_batch_size, n)
            chunk_inputs = {name: array[lo:hi] for name, array in inputs.items()}
            self._queue.append(_Chunk(request, index, chunk_inputs, hi - lo, now, deadline))
        self._set_depth(self._depth + n)
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            # The caller gave up: its chunks that have not run yet should cost nothing.
            self._discard(request)
            raise

    async def stop(self) -> None:
        """Stop accepting (submit raises Unavailable), run everything already queued, then end the workers."""
        self._accepting = False
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        await asyncio.gather(*self._tasks)
        if self._executor is not None:
            self._executor.shutdown()  # nothing is left to run, so this does not block the loop
            self._executor = None

    async def _worker(self) -> None:
        assert self._wakeup is not None
        while True:
            wait = self._seconds_until_ready()
            if wait is None and self._closing:
                return
            if wait == 0:
                batch = self._take()
                if batch:
                    await self._run(batch)
                continue
            # Clearing and checking happen with no await in between, so a submit() can never be missed.
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait)

    def _seconds_until_ready(self) -> float | None:
        """0: take a batch now; None: nothing queued; else seconds until the oldest chunk's delay ends."""
        if not self._queue:
            return None
        cfg = self.config
        if self._closing or not cfg.enabled or self._depth >= cfg.max_batch_size:
            return 0.0
        if cfg.adaptive and not self._concurrent:
            return 0.0
        return max(0.0, self._queue[0].queued_at + cfg.max_delay_ms / 1000 - self._clock())

    def _take(self) -> list[_Chunk]:
        """Pop the next batch in FIFO order, up to max_batch_size samples; requests past their deadline fail instead."""
        now = self._clock()
        cfg = self.config
        before = self._depth
        batch: list[_Chunk] = []
        size = 0
        # Strict FIFO (no smaller chunk overtakes the head): O(batch) per take, and no chunk can starve.
        while self._queue and size + self._queue[0].size <= cfg.max_batch_size:
            chunk = self._queue.popleft()
            self._depth -= chunk.size
            if chunk.request.future.done():
                # Cancelled, but the submit() task has not run its own cleanup yet.
                self._discard(chunk.request)
            elif chunk.deadline is not None and now >= chunk.deadline:
                waited = now - chunk.queued_at
                self._fail(chunk.request, DeadlineExceeded(f"deadline passed after {waited:.3f} s in the batch queue"))
            else:
                batch.append(chunk)
                size += chunk.size
                self._observer.queue_wait(now - chunk.queued_at)
                if not cfg.enabled:
                    break
        if self._depth != before:
            self._observer.depth(self._depth)
        return batch

    async def _run(self, batch: list[_Chunk]) -> None:
        # Adaptive delay: wait for company only while requests are arriving together. A lone caller (the
        # last batch held one chunk) never pays max_delay_ms; under concurrency the wait fills batches.
        self._concurrent = len(batch) > 1 or len(self._queue) > 0
        loop = asyncio.get_running_loop()
        result, seconds = await loop.run_in_executor(self._executor, self._call, batch)
        if isinstance(result, Exception):
            for chunk in batch:
                self._fail(chunk.request, result)
            return
        self._observer.batch(sum(chunk.size for chunk in batch), seconds)
        offset = 0
        for chunk in batch:
            request = chunk.request
            request.parts[chunk.index] = result[offset : offset + chunk.size]
            offset += chunk.size
            request.pending -= 1
            if request.pending == 0 and not request.future.done():
                parts = request.parts
                request.future.set_result(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def _call(self, batch: list[_Chunk]) -> tuple[np.ndarray | Exception, float]:
        """On a worker thread: concatenate, run and time the batch; an error is returned for the batch's requests."""
        size = sum(chunk.size for chunk in batch)
        start = self._clock()
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = {name: np.concatenate([c.inputs[name] for c in batch]) for name in batch[0].inputs}
            output = np.asarray(self._run_batch(inputs))
            if output.ndim == 0 or len(output) != size:
                raise RuntimeError(f"run_batch returned shape {output.shape} for a batch of {size} samples")
        except Exception as exc:  # belongs to this batch's requests only; the worker keeps serving
            return exc, self._clock() - start
        return output, self._clock() - start

    def _fail(self, request: _Request, exc: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
        if len(request.parts) > 1:  # a one-chunk request failing here is off the queue: skip the O(queue) scan
            self._discard(request)  # its other chunks would only produce rows nobody can receive

    def _discard(self, request: _Request) -> None:
        removed = sum(c.size for c in self._queue if c.request is request)
        if removed:
            self._queue = deque(c for c in self._queue if c.request is not request)
            self._set_depth(self._depth - removed)

    def _set_depth(self, samples: int) -> None:
        self._depth = samples
        self._observer.depth(samples)


def _leading_length(inputs: dict[str, np.ndarray]) -> int:
    """The shared length n >= 1 of the arrays' first axis."""
    lengths = {name: len(array) if getattr(array, "ndim", 0) else 0 for name, array in inputs.items()}
    n = next(iter(lengths.values()), 0)
    if n < 1 or any(length != n for length in lengths.values()):
        raise ValueError(f"inputs must be arrays sharing a leading axis of length >= 1, got lengths {lengths}")
    return n
