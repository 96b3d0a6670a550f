"""In-memory operational metrics: ingest latency, throughput per minute, connections, reloads.

Durable counts (the tallies and drop reasons of agent/outcomes.py) live in the
spool's counters table; these are the process-lifetime figures around them.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from agent.clock import CLOCK

# Seconds; ingest latency is dominated by the group commit's fsync.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
HISTORY_MINUTES = 60


@dataclass
class Histogram:
    """A Prometheus-style cumulative histogram."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1


@dataclass
class Minute:
    minute: int   # minutes of the agent's clock (CLOCK.elapsed_s), not of the wall clock
    events_in: int = 0    # new events stored (ingested; an app's resends are not)
    events_out: int = 0   # events acked, once their delete is saved


class Metrics:
    """Process-lifetime metrics."""

    def __init__(self) -> None:
        self.ingest_latency = Histogram()
        self.history: deque[Minute] = deque(maxlen=HISTORY_MINUTES)
        # By the agent's clock: uptime is time passed, not a difference of wall times,
        # which a clock corrected from 1970 would make decades (or negative).
        self._started_s = CLOCK.elapsed_s()
        # Client connections (agent/server/connections.py): open now, the cap, closes by reason.
        self.connections_open = 0
        self.connections_cap = 0
        self.connections_closed: dict[str, int] = {}
        self.express_requests = 0  # answered by the express lane (agent/server/express.py)
        # Admission control (agent/server/admission.py): request bodies in flight, the budget,
        # requests refused as busy, and heap trims after bursts.
        self.inflight_bytes = 0
        self.inflight_budget = 0
        self.busy_refusals = 0
        self.memory_trims = 0
        # Ingest requests refused (agent/server/app.py), by (API, HTTP status or websocket
        # close code). Requests, not events: most are refused before their events are read.
        self.refused: dict[tuple[str, int], int] = {}
        # The live event view (agent/ops/tail.py): viewers now, messages dropped for slow ones,
        # viewers closed by reason (their place taken by a new one, or not reading).
        self.tail_viewers = 0
        self.tail_dropped = 0
        self.tail_closed: dict[str, int] = {}
        # Reloads (SIGHUP): applied, refused (the running config kept), the last refusal
        # (cleared by a reload applied), and what the running config still lacks of the
        # file until a restart. After a plain kill -HUP the log alone said so.
        self.reloads_applied = 0
        self.reloads_refused = 0
        self.reload_error: str | None = None
        self.reload_error_at: float | None = None   # by CLOCK.elapsed_s, as last_ack
        self.needs_restart: list[str] = []

    def uptime_s(self) -> float:
        """Seconds since the agent started, suspend included where the OS counts it."""
        return CLOCK.elapsed_s() - self._started_s

    @staticmethod
    def _minute() -> int:
        # The agent's clock: keyed on the wall clock's minutes, a clock set back made a
        # minute come again and replace another's counts, and one set forward left a gap.
        return int(CLOCK.elapsed_s() // 60)

    def _bucket(self) -> Minute:
        minute = int(CLOCK.elapsed_s() // 60)   # _minute(), one call fewer: every request
        if not self.history or self.history[-1].minute != minute:
            self.history.append(Minute(minute))
        return self.history[-1]

    def observe_in(self, events: int) -> None:
        """``events`` new events stored: counted once per commit (server/intake.py), not
        per request (a request's latency goes to ``ingest_latency``)."""
        self._bucket().events_in += events

    def observe_acked(self, events: int) -> None:
        self._bucket().events_out += events

    def refuse(self, api: str, status: int) -> None:
        self.refused[(api, status)] = self.refused.get((api, status), 0) + 1

    def refusals(self) -> dict[str, dict[str, int]]:
        """Refused requests as {api: {status: n}}, sorted."""
        out: dict[str, dict[str, int]] = {}
        for (api, status), n in sorted(self.refused.items()):
            out.setdefault(api, {})[str(status)] = n
        return out

    def series(self) -> list[dict[str, int]]:
        """Events in and out for each of the last 60 minutes, oldest first, gaps as zero;
        each labelled ``t`` with its start's Unix time by the wall clock as it reads now."""
        now = self._minute()
        by_minute = {m.minute: m for m in self.history}
        out = []
        for minute in range(now - HISTORY_MINUTES + 1, now + 1):
            m = by_minute.get(minute)
            out.append({"t": round(CLOCK.wall_s_at(minute * 60)), "in": m.events_in if m else 0,
                        "out": m.events_out if m else 0})
        return out
