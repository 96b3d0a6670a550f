"""Time as the agent sees it: the device's wall clock, and the time the agent saw pass.

A device's wall clock can be wrong in either direction (a board that boots in
1970, a clock set years ahead) and be corrected later, while events wait in
the spool. Events keep the wall time they were received at, as recorded; the
agent also counts the time it has itself seen pass (``elapsed_ms``: a clock
that only moves forward and, where the OS has one, keeps counting through
suspend), and the spool carries that count across restarts. Expiry needs both
clocks to agree, or the agent's alone for a receipt the wall clock reads as still
to come (see Spool.prune); batching treats a receipt time in the future as due.
Everything reads time through ``CLOCK``, so that tests can set the wall clock
wrong and let days pass without sleeping.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial

# A clock that counts through suspend: Linux's CLOCK_BOOTTIME; macOS's CLOCK_MONOTONIC
# (Apple's clock_gettime counts sleep; time.monotonic there, mach_absolute_time, stops
# while the machine sleeps, and a sleep would read as a wall clock set forward: expiry
# late, segment-http's per-event sentAt early). Elsewhere the plain monotonic clock.
_THROUGH_SUSPEND = getattr(time, "CLOCK_MONOTONIC" if sys.platform == "darwin"
                           else "CLOCK_BOOTTIME", None)


# Chosen once, not at each read: every request reads the clocks a few times.
_elapsed_ns: Callable[[], int] = (time.monotonic_ns if _THROUGH_SUSPEND is None
                                  else partial(time.clock_gettime_ns, _THROUGH_SUSPEND))


class Clock:
    """The agent's two clocks. ``wall_shift_ms`` sets the wall clock wrong (as a device
    can have it); ``passed_ms`` lets time pass (both clocks move). Both are 0 outside tests."""

    def __init__(self) -> None:
        self.wall_shift_ms = 0
        self.passed_ms = 0
        self._offset_s = 0.0   # wall_s_at's: the wall clock's lead on elapsed_s, as last read

    def wall_ms(self) -> int:
        """The device's wall clock, in epoch milliseconds: right or wrong."""
        ms = time.time_ns() // 1_000_000
        # Both 0 outside tests: adding 0 to a large int still makes a new one (a malloc).
        shift = self.wall_shift_ms + self.passed_ms
        return ms + shift if shift else ms

    def elapsed_ms(self) -> int:
        """Milliseconds from an arbitrary start; never jumps with the wall clock."""
        return _elapsed_ns() // 1_000_000 + self.passed_ms

    def elapsed_s(self) -> float:
        """``elapsed_ms`` in seconds, finer than a millisecond (the forwarders' timers)."""
        seconds = _elapsed_ns() / 1e9
        return seconds + self.passed_ms / 1000 if self.passed_ms else seconds

    def wall_s_at(self, elapsed_s: float) -> float:
        """The Unix time, by the wall clock as it reads now, of ``elapsed_s`` (a reading of
        ``elapsed_s()``): what happened an hour ago reads an hour ago, whatever the wall
        clock did meanwhile (corrected from 1970, say). The two clocks' offset is kept
        until it moves by more than a second (a clock set): read afresh each time, its
        jitter made the same instant read differently from one status poll to the next."""
        offset = self.wall_ms() / 1000 - self.elapsed_s()
        if abs(offset - self._offset_s) > 1:
            self._offset_s = offset
        return elapsed_s + self._offset_s


CLOCK = Clock()


def until_due(received_ms: int, interval_s: float) -> float:
    """Seconds until a queue whose oldest event was received at ``received_ms`` should be
    sent (0: now). A receipt time in the future means the wall clock was set back since:
    it counts as due, or the queue would wait for the clock to catch up (for years)."""
    left = (received_ms - CLOCK.wall_ms()) / 1000 + interval_s
    return left if 0 < left <= interval_s else 0.0


def age_s(received_ms: int) -> float:
    """Seconds since ``received_ms`` by the wall clock; never negative (a clock set back)."""
    return max(0.0, (CLOCK.wall_ms() - received_ms) / 1000)
