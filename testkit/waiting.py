"""Waiting for a condition in async tests: poll, yielding to the loop, and fail instead of hanging."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.001)
