"""The time the forwarder waits by: backoff pauses, Retry-After parking, crash restarts.

A seam (as the OpenTelemetry SDK's exporters take a clock): the agent runs on its own
clock (agent/clock.py); tests pass a manual one, so that a Retry-After of an hour is
proved honoured, and cut short, without waiting any real seconds.

Not the event loop's clock: it stands still while the machine sleeps, so a laptop that
slept through a Retry-After of ten minutes waited those ten minutes again once awake,
its events held. The agent's clock counts the sleep; the loop's timers serve as alarms
at most SLEEP_CHECK_S apart, each reading it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from agent.clock import CLOCK

# A wait longer than this reads the agent's clock again this often: a wait the machine
# slept through ends at most this long after it wakes.
SLEEP_CHECK_S = 60.0
# A loop timer may fire this much before its time (uvloop's are in milliseconds): due.
_EARLY_S = 0.001


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
    """A callback at ``when`` by the agent's clock, armed on the loop a stretch of at most
    SLEEP_CHECK_S at a time. It keeps its own ``when``: uvloop's ``call_at`` for a time
    already past returns a plain Handle, which has none."""

    __slots__ = ("_when", "_callback", "_handle")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self._when = when
        self._callback = callback
        self._handle = self._arm()

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self._handle.cancel()

    def _arm(self) -> asyncio.TimerHandle:
        left = self._when - CLOCK.elapsed_s()
        return asyncio.get_running_loop().call_later(max(0.0, min(left, SLEEP_CHECK_S)),
                                                     self._fire)

    def _fire(self) -> None:
        if self._when - CLOCK.elapsed_s() > _EARLY_S:
            self._handle = self._arm()
        else:
            self._callback()


class LoopTiming:
    """Waits and timers on the running event loop, by the agent's clock."""

    def now(self) -> float:
        return CLOCK.elapsed_s()

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        end = self.now() + timeout
        while not event.is_set() and (left := end - self.now()) > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, SLEEP_CHECK_S))

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return _LoopTimer(when, callback)


LOOP_TIMING = LoopTiming()
