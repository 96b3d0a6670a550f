"""The one log line that says an upstream is back, and what its return delivered.

"upstream X recovered after N s; M events delivered": the prober (probe.py) starts a
report when a probe connects, or an ack comes, after an outage; it is logged once the
backlog the upstream had when it came back is delivered, or at the first quiet point (a check
interval without an ack while nothing is being sent: the upstream fails again, or a
sync policy holds it), or when the upstream is lost again or the agent stops. The
numbers are that upstream's own: its acks since it came back, its events still queued.
While no report is pending nothing runs; while one is, one timer every few seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.forwarder.state import UpstreamState
from agent.forwarder.timing import Timer, Timing

log = logging.getLogger("outpost.probe")


def _events(n: int) -> str:
    return f"{n} event{'' if n == 1 else 's'}"


class RecoveryReport:
    """The pending recovery line of one upstream."""

    def __init__(self, state: UpstreamState, timing: Timing, queued: Callable[[], int],
                 interval_s: float) -> None:
        self.state = state
        self._timing = timing
        self._queued = queued          # events queued for the upstream now
        self._interval = interval_s
        self._timer: Timer | None = None
        self._outage_s = 0.0
        self._acked_at_return = 0      # state.acked when it came back
        self._acked_at_check = 0       # state.acked at the last check
        self._backlog = 0              # events queued when it came back

    def start(self, outage_s: float, acked_before: int) -> None:
        """The upstream answers again after ``outage_s`` seconds unreachable; its acks
        counted ``acked_before`` when it was lost (acks since count among what it
        delivered: the one that found it back, or a reload's stopping loops')."""
        self.finish()
        self._outage_s = outage_s
        self._acked_at_return = acked_before
        self._acked_at_check = self.state.acked
        self._backlog = self._queued() + self.state.acked - acked_before
        self._arm()

    def finish(self) -> None:
        """Log the pending report now, if there is one."""
        if self._timer is None:
            return
        self._timer.cancel()
        self._timer = None
        left = self._queued()
        log.info("upstream %s recovered after %.0fs; %s delivered%s", self.state.name,
                 self._outage_s, _events(self.state.acked - self._acked_at_return),
                 f"; {_events(left)} still queued" if left else "")

    def _arm(self) -> None:
        self._timer = self._timing.call_at(self._timing.now() + self._interval, self._check)

    def _check(self) -> None:
        acked = self.state.acked
        quiet = acked == self._acked_at_check and not self.state.sending
        if quiet or acked - self._acked_at_return >= self._backlog or not self._queued():
            self.finish()
            return
        self._acked_at_check = acked
        self._arm()
