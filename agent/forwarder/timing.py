"""The time the forwarder waits by: backoff pauses, Retry-After parking, crash restarts.

A seam (as the OpenTelemetry SDK's exporters take a clock): the agent runs on the
event loop's own clock; tests pass a manual one, so that a Retry-After of an hour is
proved honoured, and cut short, without waiting any real seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """A pending callback; what ``Timing.call_at`` returns."""

    def when(self) -> float: ...

    def cancel(self) -> None: ...


class Timing(Protocol):
    """What the forwarder needs of time: now, a wait that an event cuts short, a timer."""

    def now(self) -> float: ...

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        """Return once ``event`` is set or ``timeout`` seconds have passed."""
        ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer: ...


class _LoopTimer:
    """A loop timer that knows its time: uvloop's ``call_at`` for a time already past
    returns a plain Handle, which has no ``when()``."""

    __slots__ = ("_when", "_handle")

    def __init__(self, when: float, handle: asyncio.Handle) -> None:
        self._when = when
        self._handle = handle

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self._handle.cancel()


class LoopTiming:
    """The running event loop's monotonic clock."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return _LoopTimer(when, asyncio.get_running_loop().call_at(when, callback))


LOOP_TIMING = LoopTiming()
