"""The status snapshot behind GET /status, GET /metrics, `outpost status` and the status page.

One typed structure, built in one place, so that the table, the page and Prometheus
can never disagree about a figure. ``offline_snapshot`` gives the same keys read
straight from the spool file when no agent is running; what only a running agent
knows is null there.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

from agent import __version__, outcomes
from agent.clock import CLOCK, age_s
from agent.forwarder.state import UpstreamState
from agent.metrics import Metrics
from agent.ops.dead_reasons import NewestReasons, redacted
from agent.settings import Config, UpstreamConfig
from agent.spool import Spool, dead
from agent.spool.books import group
from agent.spool.schema import read_offline
from agent.spool.types import Stream, Totals
from agent.sync.held import held_by_lane
from agent.sync.monitor import SyncView
from agent.sync.policy import held_lanes
from agent.terminal import os_text


class Unrouted(TypedDict):
    keys: int
    queue_depth: int


class SpoolUse(TypedDict):
    path: str
    used_bytes: int | None
    max_bytes: int | None
    expiry_errors: int | None          # expiry runs that failed (Spool.prune)
    expiry_last_error: str | None
    open_error: str | None             # why the spool cannot be opened (apps get 503); null once open


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
    frame_limit_bytes: int | None  # batches cut to this after it refused one (1009, a 413)
    slow_limit_bytes: int | None   # batches cut to this while its link is too slow for more


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


class ReloadStatus(TypedDict):
    """Reloads (SIGHUP) since the start: the last refusal, cleared by a reload applied, and
    the changes of the file that wait for a restart."""

    applied: int
    refused: int
    last_error: str | None
    last_error_at: float | None
    needs_restart: list[str]
    config: str | None   # the file a reload re-reads, absolute (null: it looks one up)
    pid: int             # the process a reload signals


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
    dead_reasons_error: str | None  # why they could not be read now (they are the last read)
    counters: dict[str, int]    # every outcomes.Tally and outcomes.Drop, by name
    drops: dict[str, int]       # every outcomes.Drop
    upstreams: list[UpstreamStatus]
    history: list[dict[str, int]] | None  # events in and out per minute, last hour
    connections: Connections | None
    ingest: Ingest | None
    sync: SyncStatus | None     # null offline: only a running agent reads network and battery
    reload: ReloadStatus | None  # null offline


Groups = Mapping[str | None, Totals]
_EMPTY = Totals()


def _wall(elapsed_s: float | None) -> float | None:
    """A time kept by the agent's clock (UpstreamState, a refused reload), as a Unix time."""
    return None if elapsed_s is None else round(CLOCK.wall_s_at(elapsed_s), 3)


def _text(said: str | None) -> str | None:
    return None if said is None else os_text(said)


def _upstream(up: UpstreamConfig, groups: Groups, live: UpstreamState | None) -> UpstreamStatus:
    queued = groups.get(up.name, _EMPTY)
    lost = live.unreachable_since if live else None
    return {"name": up.name, "protocol": up.protocol, "url": up.url,
            "state": "offline" if live is None else live.shown,
            "queue_depth": queued.depth, "queue_bytes": queued.bytes, "keys": queued.keys,
            "last_ack": _wall(live.last_ack) if live else None,
            "last_error": live.error_shown if live else None,
            "last_error_at": _wall(live.last_error_at) if live else None,
            "retries": live.retries if live else None,
            "sent": live.sent if live else None,
            "acked": live.acked if live else None,
            "dead_lettered": live.dead_lettered if live else None,
            "crashes": live.crashes if live else None,
            "unreadable_replies": live.unreadable_replies if live else None,
            "unreachable_for_s": round(CLOCK.elapsed_s() - lost, 1) if lost is not None
            else None,
            "probes": live.probes if live else None,
            "frame_limit_bytes": live.frame_limit_bytes if live else None,
            "slow_limit_bytes": live.slow_limit_bytes if live else None}


def _snapshot(cfg: Config, source: str, groups: Groups, counts: outcomes.Counts, dead: int,
              spool: SpoolUse, states: Mapping[str, UpstreamState]) -> Snapshot:
    """``groups``: the queues summed per upstream name of ``cfg`` (None: keys no upstream
    takes), as the spool's books keep them; never a pass over the keys."""
    unrouted = groups.get(None, _EMPTY)
    return {
        "version": __version__, "time": round(CLOCK.wall_ms() / 1000, 3), "source": source,
        "uptime_s": None, "queue_depth": sum(t.depth for t in groups.values()),
        "oldest_event_age_s": None,
        "unrouted": {"keys": unrouted.keys, "queue_depth": unrouted.depth},
        "spool": spool, "dead_letters": dead, "dead_reasons": [],
        "dead_reasons_error": None,
        "counters": outcomes.totals(counts), "drops": outcomes.drops(counts),
        "upstreams": [_upstream(up, groups, states.get(up.name)) for up in cfg.upstreams],
        "history": None, "connections": None, "ingest": None, "sync": None, "reload": None,
    }


async def snapshot(cfg: Config, spool: Spool, states: Mapping[str, UpstreamState],
                   metrics: Metrics, reasons: NewestReasons,
                   sync: SyncView | None = None) -> Snapshot:
    """The running agent's state; ``reasons`` keeps its dead letters' summary. Its cost
    does not grow with the keys: the books sum the queues per upstream of ``cfg`` (the
    forwarders' config, which groups them: agent/forwarder/supervisor.py)."""
    try:
        waited = await spool.first_age_s()
    except sqlite3.Error:
        # A spool failing (an I/O error, a damaged table) is when status is looked at:
        # it answers with what the books keep, as for the dead letters' reasons.
        waited = None
    # The errors' texts may name the spool's path as the OS gave it, a byte of another
    # encoding a lone surrogate, which orjson refuses (a 500): shown as the path is.
    snap = _snapshot(cfg, "agent", spool.books.groups, spool.counters, spool.dead_count,
                     {"path": os_text(spool.path), "used_bytes": spool.used_bytes,
                      "max_bytes": spool.max_bytes, "expiry_errors": spool.expiry_errors,
                      "expiry_last_error": _text(spool.expiry_last_error),
                      "open_error": _text(spool.open_error)}, states)
    groups = await reasons.get(spool)   # kept until the letters change: aged at each poll
    now = dead.Now(CLOCK.wall_ms(), spool.observed_ms())
    snap["dead_reasons"] = [dead.aged(g, now) for g in groups]
    snap["dead_reasons_error"] = reasons.error
    snap["uptime_s"] = round(metrics.uptime_s(), 1)
    snap["oldest_event_age_s"] = round(waited, 1) if waited is not None else None
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
    snap["reload"] = {"applied": metrics.reloads_applied, "refused": metrics.reloads_refused,
                      "last_error": metrics.reload_error,
                      "last_error_at": _wall(metrics.reload_error_at),
                      "needs_restart": list(metrics.needs_restart),
                      "config": (None if cfg.source == Config.source
                                 else os_text(os.path.abspath(cfg.source))),
                      "pid": os.getpid()}
    if sync is not None:
        held = held_by_lane(spool.books.groups, held_lanes(sync["profile"]))
        snap["sync"] = {**sync, "held_events": sum(held.values()), "held_lanes": held}
    return snap


def offline_snapshot(cfg: Config) -> Snapshot:
    """What the spool file alone tells (queues, counters, its size) and the config's cap;
    no live upstream state."""
    path = cfg.storage.resolved_path()
    raw = read_offline(path)
    streams = (Stream(0, key, s["depth"], s["bytes"]) for key, s in raw["streams"].items())
    snap = _snapshot(cfg, _offline_source(path, raw["exists"]), group(streams, cfg.route_name),
                     outcomes.from_names(raw["counters"].items()), raw.get("dead_letters", 0),
                     {"path": os_text(path), "used_bytes": raw.get("used_bytes"),
                      "max_bytes": cfg.storage.max_bytes, "expiry_errors": None,
                      "expiry_last_error": None, "open_error": None}, {})
    # By the wall clock alone: the agent's own time (a corrected clock) died with it.
    first = raw.get("first_received")
    snap["oldest_event_age_s"] = round(age_s(first), 1) if first is not None else None
    try:
        snap["dead_reasons"] = redacted(dead.newest_reasons(path))
    except sqlite3.DatabaseError as exc:   # their pages damaged: the rest read fine, shown
        snap["dead_reasons_error"] = str(exc) or type(exc).__name__
    return snap


def _offline_source(path: Path, exists: bool) -> str:
    """Where an offline snapshot's figures come from; a salvage still to be finished said
    first: until the agent's next start, the events wait in the file moved aside, and the
    fresh spool's figures alone would show them gone."""
    source = "spool, no agent running" if exists else "no agent running, no spool yet"
    moved = dead.waiting_salvage(path)
    if moved is None:
        return source
    return (f"{source}; a salvage is pending: the agent found the spool damaged and moved it "
            f"to {os_text(moved)}, whose events and dead letters it copies back at its next "
            "start; start the agent (`outpost run`, or the service)")
