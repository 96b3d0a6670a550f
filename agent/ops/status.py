"""The status snapshot behind GET /status, GET /metrics, `outpost status` and the status page.

One typed structure, built in one place, so that the table, the page and Prometheus
can never disagree about a figure. ``offline_snapshot`` gives the same keys read
straight from the spool file when no agent is running; what only a running agent
knows is null there.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, TypedDict

from agent import __version__, outcomes
from agent.clock import age_s
from agent.forwarder.state import UpstreamState
from agent.metrics import Metrics
from agent.ops.dead_reasons import NewestReasons, redacted
from agent.settings import Config, UpstreamConfig
from agent.spool import Spool, dead
from agent.spool.schema import read_offline
from agent.sync.held import held_by_lane
from agent.sync.monitor import SyncView
from agent.sync.policy import held_lanes


class Unrouted(TypedDict):
    keys: int
    queue_depth: int


class SpoolUse(TypedDict):
    path: str
    used_bytes: int | None
    max_bytes: int | None


class UpstreamStatus(TypedDict):
    """One upstream; the counts and the last error are the running agent's (null offline)."""

    name: str
    protocol: str
    url: str
    # idle | sending | backoff | restarting | unreachable (probed: agent/forwarder/probe.py);
    # "offline" offline
    state: str
    queue_depth: int
    queue_bytes: int
    keys: int                   # keys with events queued for it
    last_ack: float | None
    last_error: str | None
    last_error_at: float | None
    retries: int | None
    sent: int | None            # events in batches sent or tried (resends count again)
    acked: int | None
    dead_lettered: int | None
    crashes: int | None
    unreadable_replies: int | None  # upstream messages ignored as unreadable (not JSON)
    unreachable_for_s: float | None  # since a probe first failed to connect; null if reachable
    probes: int | None          # TCP probes of the upstream since start


class Connections(TypedDict):
    open: int
    max: int
    closed: dict[str, int]      # by reason
    express: int                # requests the express lane answered (agent/server/express.py)


class Ingest(TypedDict):
    inflight_bytes: int
    inflight_budget: int
    busy_refusals: int
    memory_trims: int
    refused: dict[str, dict[str, int]]  # api -> HTTP status (or websocket close code) -> n
    tail_viewers: int           # live event views open (`outpost tail`, the page's panel)
    tail_dropped: int           # messages those views missed by falling behind
    tail_closed: dict[str, int]  # views the agent closed, by reason (replaced, stalled)


class SyncStatus(SyncView):
    """The transmit profile (agent/sync/), and the events it holds back now, in all and
    per lane (``high``, ``normal``)."""

    held_events: int
    held_lanes: dict[str, int]


class Snapshot(TypedDict):
    """GET /status's body, and `outpost status --json`'s with or without an agent."""

    version: str
    time: float
    source: str
    uptime_s: float | None
    queue_depth: int
    oldest_event_age_s: float | None
    unrouted: Unrouted
    spool: SpoolUse
    dead_letters: int
    dead_reasons: list[dict[str, Any]]  # newest (reason, upstream) groups: counts, no bodies
    counters: dict[str, int]    # every outcomes.Tally and outcomes.Drop, by name
    drops: dict[str, int]       # every outcomes.Drop
    upstreams: list[UpstreamStatus]
    history: list[dict[str, int]] | None  # events in and out per minute, last hour
    connections: Connections | None
    ingest: Ingest | None
    sync: SyncStatus | None     # null offline: only a running agent reads network and battery


Queues = dict[str | None, list[int]]


def _queues(cfg: Config, streams: Mapping[str, tuple[int, int]]) -> Queues:
    """(events, bytes, keys with events) queued per upstream name; None for keys no
    upstream takes. Keys with nothing queued are skipped: any local app can invent
    keys, and routing 100,000 idle ones took a quarter of a second per snapshot."""
    out: Queues = {up.name: [0, 0, 0] for up in cfg.upstreams}
    out[None] = [0, 0, 0]
    for key, (depth, nbytes) in streams.items():
        if not depth:
            continue
        up = cfg.route(key)
        q = out[up.name if up is not None else None]
        q[0] += depth
        q[1] += nbytes
        q[2] += 1
    return out


def _upstream(up: UpstreamConfig, queues: Queues, live: UpstreamState | None) -> UpstreamStatus:
    depth, nbytes, keys = queues[up.name]
    lost = live.unreachable_since if live else None
    return {"name": up.name, "protocol": up.protocol, "url": up.url,
            "state": ("offline" if live is None else "unreachable" if lost is not None
                      else live.state),
            "queue_depth": depth, "queue_bytes": nbytes, "keys": keys,
            "last_ack": live.last_ack if live else None,
            "last_error": live.last_error if live else None,
            "last_error_at": live.last_error_at if live else None,
            "retries": live.retries if live else None,
            "sent": live.sent if live else None,
            "acked": live.acked if live else None,
            "dead_lettered": live.dead_lettered if live else None,
            "crashes": live.crashes if live else None,
            "unreadable_replies": live.unreadable_replies if live else None,
            "unreachable_for_s": round(max(0.0, time.time() - lost), 1) if lost is not None
            else None,
            "probes": live.probes if live else None}


def _snapshot(cfg: Config, source: str, depth: int, streams: Mapping[str, tuple[int, int]],
              counts: outcomes.Counts, dead: int, spool: SpoolUse,
              states: Mapping[str, UpstreamState]) -> Snapshot:
    queues = _queues(cfg, streams)
    return {
        "version": __version__, "time": round(time.time(), 3), "source": source,
        "uptime_s": None, "queue_depth": depth, "oldest_event_age_s": None,
        "unrouted": {"keys": queues[None][2], "queue_depth": queues[None][0]},
        "spool": spool, "dead_letters": dead, "dead_reasons": [],
        "counters": outcomes.totals(counts), "drops": outcomes.drops(counts),
        "upstreams": [_upstream(up, queues, states.get(up.name)) for up in cfg.upstreams],
        "history": None, "connections": None, "ingest": None, "sync": None,
    }


async def snapshot(cfg: Config, spool: Spool, states: Mapping[str, UpstreamState],
                   metrics: Metrics, reasons: NewestReasons,
                   sync: SyncView | None = None) -> Snapshot:
    """The running agent's state; ``reasons`` keeps its dead letters' summary."""
    oldest = await spool.oldest_received()
    snap = _snapshot(cfg, "agent", spool.depth,
                     {k: (s.depth, s.bytes) for k, s in spool.streams.items() if s.depth},
                     spool.counters, spool.dead_count,
                     {"path": str(spool.path), "used_bytes": spool.used_bytes,
                      "max_bytes": spool.max_bytes}, states)
    snap["dead_reasons"] = await reasons.get(spool)
    snap["uptime_s"] = round(max(0.0, time.time() - metrics.started), 1)
    snap["oldest_event_age_s"] = round(age_s(oldest), 1) if oldest is not None else None
    snap["history"] = metrics.series()
    snap["connections"] = {"open": metrics.connections_open, "max": metrics.connections_cap,
                           "closed": dict(sorted(metrics.connections_closed.items())),
                           "express": metrics.express_requests}
    snap["ingest"] = {"inflight_bytes": metrics.inflight_bytes,
                      "inflight_budget": metrics.inflight_budget,
                      "busy_refusals": metrics.busy_refusals,
                      "memory_trims": metrics.memory_trims,
                      "refused": metrics.refusals(),
                      "tail_viewers": metrics.tail_viewers,
                      "tail_dropped": metrics.tail_dropped,
                      "tail_closed": dict(metrics.tail_closed)}
    if sync is not None:
        held = held_by_lane(cfg, spool.streams.values(), held_lanes(sync["profile"]))
        snap["sync"] = {**sync, "held_events": sum(held.values()), "held_lanes": held}
    return snap


def offline_snapshot(cfg: Config) -> Snapshot:
    """What the spool file alone tells: queues and counters, no live upstream state."""
    path = cfg.storage.resolved_path()
    raw = read_offline(path)
    snap = _snapshot(cfg, "spool, no agent running" if raw["exists"] else
                     "no agent running, no spool yet", raw["depth"],
                     {k: (s["depth"], s["bytes"]) for k, s in raw["streams"].items()},
                     outcomes.from_names(raw["counters"].items()), raw.get("dead_letters", 0),
                     {"path": str(path), "used_bytes": None, "max_bytes": None}, {})
    snap["dead_reasons"] = redacted(dead.newest_reasons(path))
    return snap
