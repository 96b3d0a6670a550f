"""Log lines for a state that may flap (the transmit profile, the metered reading).

NetworkManager can flip ``Metered`` many times a second: a line per change would
flood the log. The first change is logged at once; changes in the next interval
are counted, and when it ends one line gives the state then in force and how many
changes it stands for, so the first and the latest state are always in the log.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol

SUMMARY_S = 60.0   # at most one line per interval while the state keeps changing


class Timer(Protocol):
    """A pending callback."""

    def cancel(self) -> None: ...


class Timers(Protocol):
    """The clock the summaries are timed by (the forwarders' Timing fits): tests move it."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer: ...


class Changes:
    """Logs each change of one state at info, at most once per ``interval_s``."""

    def __init__(self, logger: logging.Logger, timers: Timers,
                 interval_s: float = SUMMARY_S) -> None:
        self._log = logger
        self._timers = timers
        self.interval_s = interval_s
        self._logged = -math.inf   # when the last line was
        self._timer: Timer | None = None   # the summary's, only while changes are counted
        self._latest: tuple[str, tuple[object, ...]] | None = None   # not logged yet
        self._more = 0

    def log(self, msg: str, *args: object) -> None:
        """Log a change (``msg % args``) now, or count it for a summary at the end of the
        interval the last line started."""
        now = self._timers.now()
        if self._timer is None and now - self._logged >= self.interval_s:
            self._log.info(msg, *args)
            self._logged = now
            return
        self._latest, self._more = (msg, args), self._more + 1
        if self._timer is None:
            self._timer = self._timers.call_at(self._logged + self.interval_s, self._summary)

    def logged(self, msg: str, *args: object) -> None:
        """A change another line has logged already (a failed reading's warning): a
        summary due counts it and ends on it, or it would name an older state as the one
        in force, after that line."""
        if self._timer is not None:
            self._latest, self._more = (msg, args), self._more + 1

    def close(self) -> None:
        """Log the summary due now, as the owner stops: the latest state is not lost."""
        if self._timer is not None:
            self._timer.cancel()
            self._summary()

    def _summary(self) -> None:
        assert self._latest is not None
        (msg, args), more, now = self._latest, self._more, self._timers.now()
        self._log.info(msg + " (%d more %s in the last %.0fs)", *args, more,
                       "change" if more == 1 else "changes", now - self._logged)
        self._latest, self._more, self._logged, self._timer = None, 0, now, None
