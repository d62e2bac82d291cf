"""A bounded response cache: a GAN's answer is a pure function of (model, version, seeds, labels, ψ, output), so a
request seen before can be answered without the model. Least recently used entries leave first; the bound is in
bytes of images held, not in entries. Used on the event loop only: no locking.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable

from service.domain import Result


def size(result: Result) -> int:
    """Bytes a result holds: its arrays and encoded files."""
    arrays = sum(a.nbytes for a in (result.pixels, result.latents) if a is not None)
    return arrays + sum(map(len, result.pngs)) + len(result.grid_png)


class ResultCache:
    """At most `max_bytes` of results by key; `counted(hit)` is told of every lookup, `held(bytes)` of the total."""

    def __init__(
        self, max_bytes: int, counted: Callable[[bool], None] = lambda hit: None,
        held: Callable[[int], None] = lambda total: None,
    ):  # fmt: skip
        self.max_bytes, self._counted, self._held = max_bytes, counted, held
        self._entries: OrderedDict[Hashable, tuple[Result, int]] = OrderedDict()
        self.bytes = 0

    def get(self, key: Hashable) -> Result | None:
        entry = self._entries.get(key)
        self._counted(entry is not None)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, result: Result) -> None:
        """Keep `result` under `key`, dropping the least recently used until it fits; one bigger than the whole
        cache is not kept."""
        n = size(result)
        if n > self.max_bytes:
            return
        # Its own arrays: a view into a whole batch's output would keep the batch alive, uncounted.
        copy = [None if a is None else a.copy() for a in (result.pixels, result.latents)]
        result = dataclasses.replace(result, pixels=copy[0], latents=copy[1])
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        while self.bytes + n > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
        self._entries[key] = (result, n)
        self.bytes += n
        self._held(self.bytes)
