"""Models whose time the test controls: a real tiny ONNX session whose runs wait at a gate the test opens.

    gate = Gate()
    async with running(repo, session_factory=sessions(slow=gate.wait)) as (server, stub, _):
        call = asyncio.ensure_future(stub.Generate(...))
        await gate.reached()  # its batch is inside run(), held
        ...                   # drain, unload, overflow the queue: nothing can finish meanwhile
        gate.open()

The registry builds sessions through its `session_factory`; `sessions` hands a `HookedSession` to the models it
names and a real Session to the others. The hooked one is real in everything but time: the spec, metadata and
outputs are the ONNX file's (so the registry checks it as it checks any file); `run` calls the hook first, and
`warm_up` returns fixed timings instead of measuring, so a load takes no calibrated while either.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from service.config import RuntimeConfig
from service.runtime import Session, buckets

Hook = Callable[[dict[str, np.ndarray]], None]
RUN_SECONDS_PER_SAMPLE = 1e-4  # what warm_up reports: flat per sample, so the largest batch is chosen


class Gate:
    """Holds each caller of `wait` until the test lets it through: `release(n)` lets n go, `open()` all."""

    def __init__(self, is_open: bool = False, timeout: float = 60.0):
        self._cv = threading.Condition()
        self._open, self._permits, self.timeout = is_open, 0, timeout
        self.arrived = 0  # callers that reached the gate, in all
        self.waiting = 0  # callers held at it now

    def wait(self, _feeds: object = None) -> None:
        """Block until released; a hook for `sessions`, or a stand-in for any slow call (ignores its argument)."""
        with self._cv:
            self.arrived += 1
            self.waiting += 1
            self._cv.notify_all()
            try:
                # A bound, so that a test that never opens the gate fails instead of hanging the suite.
                if not self._cv.wait_for(lambda: self._open or self._permits > 0, self.timeout):
                    raise TimeoutError(f"gate: held for {self.timeout} s and never released")
                if not self._open:
                    self._permits -= 1
            finally:
                self.waiting -= 1

    def release(self, n: int = 1) -> None:
        with self._cv:
            self._permits += n
            self._cv.notify_all()

    def open(self) -> None:
        with self._cv:
            self._open = True
            self._cv.notify_all()

    def close(self) -> None:
        """Callers that arrive from now on are held again."""
        with self._cv:
            self._open, self._permits = False, 0

    async def reached(self, n: int = 1, held: bool = False) -> None:
        """Returns once `n` callers have arrived in all (`held`: are held at the gate now)."""

        def until() -> bool:
            with self._cv:
                return self._cv.wait_for(lambda: (self.waiting if held else self.arrived) >= n, self.timeout)

        if not await asyncio.to_thread(until):
            raise TimeoutError(f"gate: {n} caller(s) never arrived")


class HookedSession:
    """A real Session over the file, with `hook(feeds)` called before every run and fixed warm-up timings."""

    def __init__(self, path: Path, config: RuntimeConfig, hook: Hook, concurrent_runs: int = 0):
        self.real = Session(path, config)
        self.session = self.real.session  # what the registry's spec check reads
        self.metadata, self.on_gpu, self.provider = self.real.metadata, self.real.on_gpu, self.real.provider
        self.concurrent_runs = concurrent_runs  # 0: the registry decides, as for a CPU session
        self.hook = hook

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        self.hook(feeds)
        return self.real.run(feeds)

    def warm_up(self, max_batch: int, latent_dim: int, num_classes: int, measure: bool = True) -> dict[int, float]:
        return {n: n * RUN_SECONDS_PER_SAMPLE for n in buckets(max_batch)} if measure else {}


def sessions(
    hooks: Mapping[str, Hook] | None = None, /, **by_name: Hook
) -> Callable[[Path, RuntimeConfig], Session | HookedSession]:
    """A registry session factory: a HookedSession for the models named ("m", or "m/2" for one version; a
    version's entry wins), a real Session for the others."""
    table = {**(hooks or {}), **by_name}

    def factory(path: Path, config: RuntimeConfig) -> Session | HookedSession:
        name, version = path.parent.parent.name, path.parent.name  # <repository>/<name>/<version>/model.onnx
        hook = table.get(f"{name}/{version}", table.get(name))
        return Session(path, config) if hook is None else HookedSession(path, config, hook)

    return factory
