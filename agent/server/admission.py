"""Admission control: a budget on request bodies in flight, and memory handed back after.

An ingest request holds memory from the moment its body is read until its
events are committed: the body, its parsed form (one at a time, see
dialects/offload.py), and its events waiting for the group commit. Each body
byte is counted against ``[listen] max_inflight_mb`` *before* it is read, and
a request that would not fit is answered "busy" (503, or 429 where that is the
API's retry-later status, with Retry-After) without reading it, so the agent's
peak stays bounded however many apps post at once. A request larger than the
whole budget is still taken when nothing else is in flight: it is refused only
while others are.

Once a burst is over, memory.Trimmer hands the freed memory back to the OS.
"""

from __future__ import annotations

import logging
from typing import Self

from agent.dialects.body import Busy
from agent.logs import log_limited
from agent.metrics import Metrics
from agent.server.memory import Trimmer

log = logging.getLogger("outpost.admission")

RETRY_AFTER_S = 1  # in-flight bodies clear within a commit or two


class Admission:
    """The in-flight byte budget shared by every ingest route."""

    def __init__(self, budget: int, metrics: Metrics) -> None:
        self.budget = budget
        self.metrics = metrics
        metrics.inflight_budget = budget
        self.trimmer = Trimmer(metrics)

    def take(self, n: int, own: int = 0) -> None:
        """Reserve ``n`` more bytes for a request already holding ``own``; raises Busy
        when they would pass the budget while other requests are in flight."""
        held = self.metrics.inflight_bytes
        # Refused or not, the body was, or was about to be, in memory (a websocket
        # frame is read whole before it can be refused).
        self.trimmer.activity(n)
        if held > own and held + n > self.budget:
            self.metrics.busy_refusals += 1
            log_limited(log, logging.WARNING, "busy",
                        "refusing a request: %d bytes in flight, %d more would pass the "
                        "%d byte budget ([listen] max_inflight_mb)", held, n, self.budget)
            raise Busy(f"{held + n} bytes of request bodies would be in flight, over the "
                       f"{self.budget} byte budget", RETRY_AFTER_S)
        self.metrics.inflight_bytes = held + n

    def give(self, n: int) -> None:
        self.metrics.inflight_bytes -= n
        if self.metrics.inflight_bytes == 0:
            self.trimmer.idle()

    def ticket(self) -> Ticket:
        return Ticket(self)

    def close(self) -> None:
        self.trimmer.close()


class Ticket:
    """One request's (or websocket frame's) share of the budget, all given back at once."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.held = 0

    def take(self, n: int) -> None:
        self._admission.take(n, self.held)
        self.held += n

    def give(self, n: int) -> None:
        n = min(n, self.held)
        self.held -= n
        self._admission.give(n)

    def release(self, *_: object) -> None:
        """Give back all it holds; also the ticket's ``__exit__``: every request ends here,
        in two calls, not four."""
        held, self.held = self.held, 0
        self._admission.give(held)

    def __enter__(self) -> Self:
        return self

    __exit__ = release
