"""Unit tests for the dynamic batcher, with a fake run_batch (no gRPC, no ONNX)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest

from service.batcher import HIGH, Batcher
from service.config import BatchingConfig
from service.errors import DeadlineExceeded, QueueFull, Unavailable
from testkit.waiting import until


class FakeModel:
    """run_batch stand-in: out = 2·z + sum(y); records batch sizes, the z rows it saw, and its threads."""

    def __init__(self, gate: threading.Event | None = None, barrier: threading.Barrier | None = None):
        self.gate, self.barrier = gate, barrier
        self.sizes: list[int] = []
        self.rows: list[float] = []
        self.threads: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        z, y = inputs["z"], inputs["y"]
        with self.lock:
            self.sizes.append(len(z))
            self.rows.extend(z[:, 0].tolist())
            self.threads.add(threading.get_ident())
        if self.barrier is not None:
            self.barrier.wait()
        if self.gate is not None:
            assert self.gate.wait(timeout=5), "test never opened the gate"
        if (z[:, 0] < 0).any():
            raise ValueError("poisoned row")
        return z * 2 + y.sum(axis=1, keepdims=True)


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A BatchObserver that remembers every call."""

    def __init__(self):
        self.waits: list[float] = []
        self.batches: list[int] = []
        self.depths: list[int] = []

    def queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def batch(self, size: int, run_seconds: float) -> None:
        assert run_seconds >= 0
        self.batches.append(size)

    def depth(self, samples: int) -> None:
        self.depths.append(samples)


def config(**changes) -> BatchingConfig:
    """One worker and a fixed delay, unless a test says otherwise."""
    return BatchingConfig(**({"workers": 1, "adaptive": False} | changes))


def request(tag: int, n: int = 1) -> dict[str, np.ndarray]:
    """n rows whose values identify the request (tag) and the row; z[:, 0] = tag·1000 + row."""
    z = (np.arange(n * 4, dtype=np.float32).reshape(n, 4) // 4) + np.float32(tag * 1000)
    y = np.full((n, 3), tag, dtype=np.float32)
    return {"z": z, "y": y}


def expected(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return inputs["z"] * 2 + inputs["y"].sum(axis=1, keepdims=True)


def run(make_batcher: Callable[[], Batcher], body: Callable[[Batcher], object]) -> None:
    """Start a batcher inside asyncio.run, run the async `body`, always stop it."""

    async def main() -> None:
        batcher = make_batcher()
        await batcher.start()
        try:
            await body(batcher)
        finally:
            await batcher.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("max_delay_ms", -1),
        ("max_delay_ms", float("inf")),
        ("max_queue", 0),
        ("workers", -1),
        ("preferred_batch_size", -1),
        ("preferred_batch_size", 129),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BatchingConfig(**{field: value})


def test_concurrent_requests_form_batches_and_each_gets_its_own_rows():
    model = FakeModel()
    inputs = [request(tag) for tag in range(16)]

    async def body(b: Batcher) -> None:
        results = await asyncio.gather(*(b.submit(x) for x in inputs))
        for x, out in zip(inputs, results, strict=True):
            np.testing.assert_array_equal(out, expected(x))

    # A long delay: batches must go because they are full, not because the delay ran out.
    run(lambda: Batcher(model, config(max_batch_size=8, max_delay_ms=5000)), body)
    assert sum(model.sizes) == 16
    assert all(1 < s <= 8 for s in model.sizes), model.sizes


def test_zero_delay_takes_what_piled_up_while_the_worker_was_busy():
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async def body(b: Batcher) -> None:
        first = asyncio.create_task(b.submit(request(0)))
        await until(lambda: model.sizes == [1])  # the worker is now blocked inside run_batch
        rest = [asyncio.create_task(b.submit(request(tag))) for tag in range(1, 6)]
        await until(lambda: b.queue_depth == 5)
        gate.set()
        await asyncio.gather(first, *rest)

    run(lambda: Batcher(model, config(max_batch_size=8, max_delay_ms=0)), body)
    assert model.sizes == [1, 5]


@pytest.mark.parametrize(("delay_ms", "sizes"), [(300, [3]), (0, [1, 1, 1])])
def test_delay_lets_a_partial_batch_gather_then_go(delay_ms, sizes):
    """Requests one after another: a delay gathers them into one batch once it ends; with none each runs alone."""
    model, clock = FakeModel(), FakeClock()

    async def body(b: Batcher) -> None:
        calls = []
        for tag in range(3):
            calls.append(asyncio.create_task(b.submit(request(tag))))
            if delay_ms:  # held: the clock stands still, so the delay has not ended
                await until(lambda n=tag + 1: b.queue_depth == n)
            else:  # ran at once, alone
                await until(lambda n=tag + 1: len(model.sizes) == n)
        assert model.sizes == ([] if delay_ms else [1, 1, 1])
        clock.now += delay_ms / 1000  # the delay ends
        await asyncio.gather(*calls)

    run(lambda: Batcher(model, config(max_batch_size=8, max_delay_ms=delay_ms), clock=clock), body)
    assert model.sizes == sizes


def test_oversized_request_is_split_and_reassembled_in_order():
    model = FakeModel()
    big, small = request(1, n=10), request(2, n=1)

    async def body(b: Batcher) -> None:
        out_big, out_small = await asyncio.gather(b.submit(big), b.submit(small))
        np.testing.assert_array_equal(out_big, expected(big))
        np.testing.assert_array_equal(out_small, expected(small))

    run(lambda: Batcher(model, config(max_batch_size=4, max_delay_ms=0)), body)
    assert sum(model.sizes) == 11
    assert max(model.sizes) <= 4
    # The big request's chunks ran in order; the small request went in with the first batch after it arrived.
    assert [r for r in model.rows if r < 2000] == big["z"][:, 0].tolist() and model.rows.index(2000.0) <= 4


def test_disabled_batching_runs_every_chunk_alone():
    model = FakeModel()

    async def body(b: Batcher) -> None:
        inputs = [request(tag) for tag in range(6)] + [request(9, n=5)]
        results = await asyncio.gather(*(b.submit(x) for x in inputs))
        for x, out in zip(inputs, results, strict=True):
            np.testing.assert_array_equal(out, expected(x))

    # Off, a request runs whole (split only at the maximum), whatever size batches would have been formed at.
    run(lambda: Batcher(model, config(max_batch_size=4, max_delay_ms=5000, enabled=False), batch_size=2), body)
    assert sorted(model.sizes) == [1, 1, 1, 1, 1, 1, 1, 4]


def test_queue_full_is_raised_beyond_capacity():
    model = FakeModel()

    async def body(b: Batcher) -> None:
        # Nothing runs yet: the batch is not full and the 5 s delay has not passed.
        queued = asyncio.create_task(b.submit(request(0, n=3)))
        await until(lambda: b.queue_depth == 3)
        with pytest.raises(QueueFull, match="4"):
            await b.submit(request(1, n=2))
        fits = asyncio.create_task(b.submit(request(2, n=1)))
        await until(lambda: b.queue_depth == 4)
        await b.stop()  # drains both
        np.testing.assert_array_equal(await queued, expected(request(0, n=3)))
        np.testing.assert_array_equal(await fits, expected(request(2, n=1)))

    run(lambda: Batcher(model, config(max_batch_size=64, max_delay_ms=5000, max_queue=4)), body)
    assert model.rows == [0.0, 1.0, 2.0, 2000.0]  # the rejected request never ran


def test_expired_chunk_is_dropped_with_deadline_exceeded():
    gate, clock, seen = threading.Event(), FakeClock(), Recorder()
    model = FakeModel(gate=gate)

    async def body(b: Batcher) -> None:
        with pytest.raises(DeadlineExceeded):
            await b.submit(request(1), deadline=clock.now - 1)  # already past
        blocker = asyncio.create_task(b.submit(request(2)))
        await until(lambda: len(model.sizes) == 1)
        late = asyncio.create_task(b.submit(request(3), deadline=clock.now + 1))
        patient = asyncio.create_task(b.submit(request(4)))
        await until(lambda: b.queue_depth == 2)
        clock.now += 5  # the deadline passes while `late` waits behind the busy worker
        gate.set()
        with pytest.raises(DeadlineExceeded):
            await late
        np.testing.assert_array_equal(await patient, expected(request(4)))
        await blocker

    run(lambda: Batcher(model, config(max_delay_ms=0), observer=seen, clock=clock), body)
    assert model.rows == [2000.0, 4000.0]  # neither expired request reached run_batch
    assert seen.waits == [0.0, 5.0]  # queue wait is measured on the injected clock


def test_cancelled_submit_frees_the_queue_and_never_runs():
    model = FakeModel()

    async def body(b: Batcher) -> None:
        task = asyncio.create_task(b.submit(request(1, n=3)))
        await until(lambda: b.queue_depth == 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert b.queue_depth == 0
        follower = asyncio.create_task(b.submit(request(2)))
        await until(lambda: b.queue_depth == 1)
        await b.stop()
        np.testing.assert_array_equal(await follower, expected(request(2)))

    run(lambda: Batcher(model, config(max_batch_size=4, max_delay_ms=5000)), body)
    assert model.rows == [2000.0]


def test_run_batch_error_reaches_only_that_batch_and_batcher_keeps_serving():
    model = FakeModel()

    async def body(b: Batcher) -> None:
        inputs = [request(tag) for tag in range(1, 9)]
        inputs[1]["z"][0, 0] = -1  # poisons the first batch of four
        results = await asyncio.gather(*(b.submit(x) for x in inputs), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results[:4]), results[:4]
        for x, out in zip(inputs[4:], results[4:], strict=True):
            np.testing.assert_array_equal(out, expected(x))
        np.testing.assert_array_equal(await b.submit(request(20, n=4)), expected(request(20, n=4)))

    run(lambda: Batcher(model, config(max_batch_size=4, max_delay_ms=5000)), body)
    assert model.sizes == [4, 4, 4]


def test_stop_finishes_queued_work_then_rejects_new_requests():
    model = FakeModel()

    async def body(b: Batcher) -> None:
        inputs = [request(tag) for tag in range(3)]
        tasks = [asyncio.create_task(b.submit(x)) for x in inputs]
        await until(lambda: b.queue_depth == 3)  # held back by the 5 s delay
        await b.stop()
        assert all(t.done() for t in tasks)
        for x, t in zip(inputs, tasks, strict=True):
            np.testing.assert_array_equal(t.result(), expected(x))
        with pytest.raises(Unavailable):
            await b.submit(request(9))

    run(lambda: Batcher(model, config(max_batch_size=8, max_delay_ms=5000)), body)
    assert model.sizes == [3]


def test_submit_before_start_is_unavailable():
    async def main() -> None:
        with pytest.raises(Unavailable):
            await Batcher(FakeModel(), config()).submit(request(0))

    asyncio.run(main())


def test_observer_sees_depth_batch_sizes_and_waits():
    seen = Recorder()
    model = FakeModel()

    async def body(b: Batcher) -> None:
        await b.submit(request(1, n=6))

    run(lambda: Batcher(model, config(max_batch_size=4, max_delay_ms=0), observer=seen), body)
    assert seen.depths == [6, 2, 0]
    assert seen.batches == [4, 2] == model.sizes
    assert len(seen.waits) == 2 and all(w >= 0 for w in seen.waits)


def test_workers_run_batches_concurrently_off_the_event_loop():
    # Each run_batch waits for the other at a barrier: this only completes if two run at the same time.
    model = FakeModel(barrier=threading.Barrier(2, timeout=5))

    async def body(b: Batcher) -> None:
        inputs = [request(1), request(2)]
        results = await asyncio.gather(*(b.submit(x) for x in inputs))
        for x, out in zip(inputs, results, strict=True):
            np.testing.assert_array_equal(out, expected(x))

    run(lambda: Batcher(model, config(max_batch_size=1, workers=2)), body)
    assert model.sizes == [1, 1]
    assert len(model.threads) == 2 and threading.get_ident() not in model.threads


def test_wrong_row_count_from_run_batch_fails_the_batch():
    async def body(b: Batcher) -> None:
        with pytest.raises(RuntimeError, match="shape"):
            await b.submit(request(1, n=3))

    run(lambda: Batcher(lambda inputs: inputs["z"][:1], config(max_delay_ms=0)), body)


def test_adaptive_delay_spares_a_lone_caller_and_waits_only_while_the_model_works():
    gate = threading.Event()
    model, clock = FakeModel(gate=gate), FakeClock()  # the clock stands still: a delay, once begun, never ends

    async def body(b: Batcher) -> None:
        gate.set()
        # Nothing running: it runs without waiting for the delay (else it would wait for ever).
        await asyncio.wait_for(b.submit(request(0)), timeout=10)
        gate.clear()
        held = asyncio.create_task(b.submit(request(1)))  # nothing running yet: it goes at once, and is held
        await until(lambda: len(model.sizes) == 2)
        # A batch is running: the next request waits for company although the second worker is free...
        second = asyncio.create_task(b.submit(request(2)))
        await until(lambda: b.queue_depth == 1)
        await asyncio.sleep(0.05)
        assert len(model.sizes) == 2 and b.queue_depth == 1
        # ...and goes with it, as a full batch, on the free worker, while the first is still held.
        third = asyncio.create_task(b.submit(request(3)))
        await until(lambda: len(model.sizes) == 3)
        gate.set()
        await asyncio.gather(held, second, third)

    run(lambda: Batcher(model, config(max_batch_size=2, max_delay_ms=500, adaptive=True, workers=2), clock=clock), body)
    assert model.sizes == [1, 1, 2]


def test_a_failing_observer_hook_costs_no_request_and_no_worker(caplog):
    class Broken(Recorder):
        def batch(self, size: int, run_seconds: float) -> None:
            raise RuntimeError("metrics backend down")

    inputs = [request(tag) for tag in range(4)]

    async def body(b: Batcher) -> None:
        for x in inputs:  # one at a time: each needs the single worker to have survived the last hook
            np.testing.assert_array_equal(await asyncio.wait_for(b.submit(x), 5), expected(x))

    with caplog.at_level("ERROR"):
        run(lambda: Batcher(FakeModel(), config(max_delay_ms=0), observer=Broken()), body)
    assert caplog.text.count("observer hook batch failed") == 1  # logged once, not once per batch


@pytest.mark.parametrize(("n", "pieces"), [(6, [3, 3]), (12, [6, 6])])
def test_a_big_request_splits_once_per_worker_no_smaller_than_the_formed_size(n, pieces):
    # Two workers, batches formed at 3, at most 8. Each extra batch costs the service time, so a big request is cut
    # into one piece per worker (6 samples: 3 + 3; 12: 6 + 6, beyond the formed size). The two pieces meet at a
    # barrier: they run at the same time, on both workers.
    model = FakeModel(barrier=threading.Barrier(2, timeout=5))

    async def body(b: Batcher) -> None:
        x = request(1, n=n)
        np.testing.assert_array_equal(await b.submit(x), expected(x))

    run(lambda: Batcher(model, config(max_batch_size=8, max_delay_ms=0, workers=2), batch_size=3), body)
    assert sorted(model.sizes, reverse=True) == pieces and len(model.threads) == 2


def test_batches_fill_to_the_formed_size_not_the_maximum():
    model = FakeModel()

    async def body(b: Batcher) -> None:
        inputs = [request(tag) for tag in range(8)]
        results = await asyncio.gather(*(b.submit(x) for x in inputs))
        for x, out in zip(inputs, results, strict=True):
            np.testing.assert_array_equal(out, expected(x))

    # A 5 s delay, yet no caller waits for it: every batch fills at 4.
    run(lambda: Batcher(model, config(max_batch_size=64, max_delay_ms=5000), batch_size=4), body)
    assert model.sizes == [4, 4]
    assert model.rows == [float(tag * 1000) for tag in range(8)]  # in arrival order


def test_a_small_request_behind_a_big_one_waits_for_one_batch_not_for_all_of_it():
    # One worker, batches of 4. The big request's first chunk is in the model when the small ones arrive: they are
    # served before the big request's remaining two chunks (least served first), and the big one still finishes.
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async def body(b: Batcher) -> None:
        big = asyncio.create_task(b.submit(request(1, n=12)))
        await until(lambda: model.sizes == [4])  # its first chunk is in the model, held
        small = [asyncio.create_task(b.submit(request(tag))) for tag in range(2, 8)]
        await until(lambda: b.queue_depth == 8 + 6)
        gate.set()
        for tag, task in zip(range(2, 8), small, strict=True):
            np.testing.assert_array_equal(await task, expected(request(tag)))
        np.testing.assert_array_equal(await big, expected(request(1, n=12)))

    run(lambda: Batcher(model, config(max_batch_size=4, max_delay_ms=0), batch_size=4), body)
    # The six small ones in arrival order, in two batches (4, then 2: the big request's next chunk of 4 does not fit
    # beside them), then the big request's last two chunks.
    assert model.sizes == [4, 4, 2, 4, 4]
    assert model.rows[4:10] == [float(tag * 1000) for tag in range(2, 8)]


def test_high_priority_goes_before_normal_work_queued_earlier():
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async def body(b: Batcher) -> None:
        first = asyncio.create_task(b.submit(request(1)))
        await until(lambda: model.sizes == [1])  # held in the model
        normal = [asyncio.create_task(b.submit(request(tag))) for tag in (2, 3)]
        urgent = asyncio.create_task(b.submit(request(9), priority=HIGH))
        await until(lambda: b.queue_depth == 3)
        gate.set()
        await asyncio.gather(first, urgent, *normal)

    run(lambda: Batcher(model, config(max_batch_size=1, max_delay_ms=0), batch_size=1), body)
    assert model.rows == [1000.0, 9000.0, 2000.0, 3000.0]


def test_an_admitted_stream_piece_queues_past_the_limit_instead_of_failing():
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async def body(b: Batcher) -> None:
        held = asyncio.create_task(b.submit(request(1)))
        await until(lambda: model.sizes == [1])
        filler = asyncio.create_task(b.submit(request(2, n=4)))  # the queue (4 samples) is now full
        await until(lambda: b.queue_depth == 4)
        with pytest.raises(QueueFull):
            await b.submit(request(3))
        piece = asyncio.create_task(b.submit(request(4), admitted=True))
        await until(lambda: b.queue_depth == 5)
        gate.set()
        np.testing.assert_array_equal(await piece, expected(request(4)))
        await asyncio.gather(held, filler)

    run(lambda: Batcher(model, config(max_batch_size=4, max_delay_ms=0, max_queue=4), batch_size=4), body)


def test_answers_come_back_on_the_event_loop_thread():
    model = FakeModel()
    seen = []

    async def body(b: Batcher) -> None:
        future = asyncio.ensure_future(b.submit(request(1)))
        future.add_done_callback(lambda _f: seen.append(threading.get_ident()))
        await future

    run(lambda: Batcher(model, config(max_delay_ms=0)), body)
    assert seen == [threading.get_ident()] and threading.get_ident() not in model.threads


def test_max_piece_bounds_the_pieces_of_a_big_request_but_never_below_the_formed_size():
    model = FakeModel()

    async def body(b: Batcher) -> None:
        x = request(1, n=12)
        np.testing.assert_array_equal(await b.submit(x), expected(x))

    # One worker would take all 12 at once (at most 8); pieces of 3 at most keep a newcomer's wait to one piece.
    run(lambda: Batcher(model, config(max_batch_size=8, max_delay_ms=0), batch_size=2, max_piece=3), body)
    # The formed size wins over a smaller max_piece.
    run(lambda: Batcher(model, config(max_batch_size=8, max_delay_ms=0), batch_size=4, max_piece=1), body)
    assert model.sizes == [3, 3, 3, 3, 4, 4, 4]


def test_pixels_are_converted_once_per_batch_on_the_worker_and_only_for_who_asked():
    model = FakeModel()
    converted: list[tuple[int, int]] = []  # (rows, thread) per conversion

    def pixels(output: np.ndarray) -> np.ndarray:
        converted.append((len(output), threading.get_ident()))
        return (output % 256).astype(np.uint8)

    async def body(b: Batcher) -> None:
        a, c = request(1, n=2), request(2, n=2)
        got_pixels, got_floats = await asyncio.gather(b.submit(a, pixels=True), b.submit(c))
        np.testing.assert_array_equal(got_pixels, (expected(a) % 256).astype(np.uint8))
        np.testing.assert_array_equal(got_floats, expected(c))
        with pytest.raises(ValueError, match="pixels"):
            await Batcher(model, config()).submit(a, pixels=True)

    run(lambda: Batcher(model, config(max_delay_ms=1000), batch_size=4, pixels=pixels), body)
    assert model.sizes == [4]  # one batch for both
    assert [rows for rows, _ in converted] == [4] and converted[0][1] in model.threads


def test_a_full_batch_wakes_a_worker_that_is_waiting_out_the_delay():
    gate = threading.Event()
    model, clock = FakeModel(gate=gate), FakeClock()  # the clock stands still: only a wake-up ends the delay

    async def body(b: Batcher) -> None:
        held = asyncio.create_task(b.submit(request(1)))
        await until(lambda: model.sizes == [1])  # running: the other worker now waits for company
        second = asyncio.create_task(b.submit(request(2)))
        await until(lambda: b.queue_depth == 1)
        third = asyncio.create_task(b.submit(request(3)))  # the batch is full: it must go now
        await until(lambda: model.sizes == [1, 2])
        gate.set()
        await asyncio.gather(held, second, third)

    run(lambda: Batcher(model, config(max_batch_size=2, max_delay_ms=500_000, adaptive=True, workers=2), clock=clock),
        body)  # fmt: skip
