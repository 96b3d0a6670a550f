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

After a burst, freed memory sits in the C allocator's free lists and RSS stays
at the peak; once nothing is in flight, ``malloc_trim`` hands it back to the OS
(see memory.py).
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Self

from .dialects.body import Busy
from .logs import log_limited
from .memory import malloc_trim
from .metrics import Metrics

log = logging.getLogger("outpost.admission")

RETRY_AFTER_S = 1  # in-flight bodies clear within a commit or two
TRIM_AFTER_BYTES = 4 * 1024 * 1024  # trimming after small traffic would gain nothing
TRIM_DELAY_S = 1.0  # let replies go out and the commit's rows be freed first


class Admission:
    """The in-flight byte budget shared by every ingest route."""

    def __init__(self, budget: int, metrics: Metrics) -> None:
        self.budget = budget
        self.metrics = metrics
        metrics.inflight_budget = budget
        self._since_trim = 0
        self._trim = malloc_trim()
        self._trim_timer: asyncio.TimerHandle | None = None
        self._trimming: asyncio.Future[int] | None = None

    @property
    def in_flight(self) -> int:
        return self.metrics.inflight_bytes

    def take(self, n: int) -> None:
        held = self.metrics.inflight_bytes
        if held and held + n > self.budget:
            self.metrics.busy_refusals += 1
            log_limited(log, logging.WARNING, "busy",
                        "refusing a request: %d bytes in flight, %d more would pass the "
                        "%d byte budget ([listen] max_inflight_mb)", held, n, self.budget)
            raise Busy(f"{held + n} bytes of request bodies would be in flight, over the "
                       f"{self.budget} byte budget", RETRY_AFTER_S)
        self.metrics.inflight_bytes = held + n
        self._since_trim += n

    def give(self, n: int) -> None:
        self.metrics.inflight_bytes -= n
        if self.metrics.inflight_bytes == 0 and self._since_trim >= TRIM_AFTER_BYTES:
            self._schedule_trim()

    def ticket(self) -> Ticket:
        return Ticket(self)

    def _schedule_trim(self) -> None:
        if self._trim is None or self._trim_timer is not None:
            return
        self._trim_timer = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._trim_now)

    def _trim_now(self) -> None:
        self._trim_timer = None
        if self._trim is None or self.in_flight or self._trimming is not None:
            return  # still busy: the next time nothing is in flight schedules it again
        self._since_trim = 0
        # Off the loop: trimming a large heap walks every free chunk.
        self._trimming = asyncio.get_running_loop().run_in_executor(None, self._trim, 0)
        self._trimming.add_done_callback(self._trimmed)

    def _trimmed(self, fut: asyncio.Future[int]) -> None:
        self._trimming = None
        if not fut.cancelled() and fut.exception() is None:
            self.metrics.memory_trims += 1

    def close(self) -> None:
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None


class Ticket:
    """One request's (or websocket frame's) share of the budget, all given back at once."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.held = 0

    def take(self, n: int) -> None:
        self._admission.take(n)
        self.held += n

    def give(self, n: int) -> None:
        n = min(n, self.held)
        self.held -= n
        self._admission.give(n)

    def release(self) -> None:
        self.give(self.held)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
