"""A forwarder clock (agent/forwarder/timing.py) that moves only when the test says so.

Pass ``Seams(timing=ManualTiming())`` to an agent: its backoff pauses, Retry-After
parking and crash restarts then wait for ``advance``, never for real seconds, and
``pending()`` shows what they wait for, so a test can prove a wait without sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ManualTimer:
    """One pending callback of a ManualTiming."""

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self._when = when
        self.callback = callback
        self.cancelled = False

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self.cancelled = True


class ManualTiming:
    """Time starts at 0 and moves only by ``advance``."""

    def __init__(self) -> None:
        self._now = 0.0
        self._timers: list[ManualTimer] = []

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> ManualTimer:
        timer = ManualTimer(when, callback)
        self._timers.append(timer)
        return timer

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        expired = asyncio.Event()
        timer = self.call_at(self._now + max(timeout, 0.0), expired.set)
        waits = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(expired.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            for w in waits:
                w.cancel()

    def pending(self) -> list[float]:
        """Seconds from now to each pending callback, soonest first."""
        self._timers = [t for t in self._timers if not t.cancelled]
        return sorted(t.when() - self._now for t in self._timers)

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: run every callback that falls due, in time order."""
        self._now += seconds
        while True:
            # A hair of slack: advancing by a pending() figure lands on its timer exactly.
            due = [t for t in self._timers if not t.cancelled and t.when() <= self._now + 1e-9]
            if not due:
                return
            timer = min(due, key=ManualTimer.when)
            self._timers.remove(timer)
            timer.callback()
