"""The status snapshot behind GET /status, GET /metrics, `outpost status` and the status page.

One dict, built in one place, so that the table, the page and Prometheus
can never disagree about a figure.  ``offline_snapshot`` gives the same
shape read straight from the spool file when no agent is running.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from agent import __version__
from agent.clock import age_s
from agent.forwarder.state import UpstreamState
from agent.metrics import Metrics
from agent.settings import Config
from agent.spool import Spool
from agent.spool.schema import read_offline

# The spool's counters that are not events lost: successes, corrupt-spool
# incidents (counted per incident, not per event), and dedupe keys forgotten to
# make room (keys of delivered events).  Every other counter is a drop reason
# (sentry-python style), so a reason added to the spool shows up here, in
# `outpost status` and in /metrics without further changes.
NOT_DROPS = frozenset({"ingested", "duplicates", "acked", "spool_corrupt",
                       "dedupe_forgotten"})
# Reported as 0 before they first happen, so dashboards see every series.
DROP_REASONS = ("dead_lettered", "expired", "dropped_full", "rejected_full",
                "rejected_storage_error", "dropped_corrupt")


def drops(counters: Mapping[str, int]) -> dict[str, int]:
    """Events lost or refused, by reason."""
    out = dict.fromkeys(DROP_REASONS, 0)
    out.update({k: v for k, v in counters.items() if k not in NOT_DROPS})
    return out


def _queues(cfg: Config, streams: Mapping[str, tuple[int, int]]) -> dict[str | None, list[int]]:
    """(events, bytes, keys with events) queued per upstream name; None for keys no
    upstream takes. Keys with nothing queued are skipped: any local app can invent
    keys, and routing 100,000 idle ones took a quarter of a second per snapshot."""
    out: dict[str | None, list[int]] = {up.name: [0, 0, 0] for up in cfg.upstreams}
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


def _common(cfg: Config, queues: dict[str | None, list[int]], depth: int,
            counters: Mapping[str, int]) -> dict[str, Any]:
    unrouted = queues[None]
    return {
        "version": __version__,
        "time": round(time.time(), 3),
        "queue_depth": depth,
        "unrouted": {"keys": unrouted[2], "queue_depth": unrouted[0]},
        "counters": dict(sorted(counters.items())),
        "drops": drops(counters),
    }


async def snapshot(cfg: Config, spool: Spool, states: Mapping[str, UpstreamState],
                   metrics: Metrics) -> dict[str, Any]:
    """The running agent's state."""
    oldest = await spool.oldest_received()
    queues = _queues(cfg, {k: (s.depth, s.bytes) for k, s in spool.streams.items() if s.depth})
    upstreams = []
    for up in cfg.upstreams:
        depth, nbytes, keys = queues[up.name]
        upstreams.append({**dataclasses.asdict(states[up.name]), "url": up.url,
                          "queue_depth": depth, "queue_bytes": nbytes, "keys": keys})
    return {
        **_common(cfg, queues, spool.depth, spool.counters),
        "source": "agent",
        "uptime_s": round(max(0.0, time.time() - metrics.started), 1),
        "spool": {"path": str(spool.path), "used_bytes": spool.used_bytes,
                  "max_bytes": spool.max_bytes},
        "oldest_event_age_s": round(age_s(oldest), 1) if oldest is not None else None,
        "upstreams": upstreams,
        "history": metrics.series(),
        "connections": {"open": metrics.connections_open, "max": metrics.connections_cap,
                        "closed": dict(sorted(metrics.connections_closed.items()))},
        "ingest": {"inflight_bytes": metrics.inflight_bytes,
                   "inflight_budget": metrics.inflight_budget,
                   "busy_refusals": metrics.busy_refusals,
                   "memory_trims": metrics.memory_trims},
    }


def offline_snapshot(cfg: Config) -> dict[str, Any]:
    """What the spool file alone tells: queues and counters, no live upstream state."""
    path = cfg.storage.resolved_path()
    raw = read_offline(path)
    streams = {k: (s["depth"], s["bytes"]) for k, s in raw["streams"].items()}
    queues = _queues(cfg, streams)
    upstreams = [{"name": up.name, "protocol": up.protocol, "url": up.url, "state": "offline",
                  "queue_depth": queues[up.name][0], "queue_bytes": queues[up.name][1],
                  "keys": queues[up.name][2], "last_ack": None, "last_error": None}
                 for up in cfg.upstreams]
    return {
        **_common(cfg, queues, raw["depth"], raw["counters"]),
        "source": "spool, no agent running" if raw["exists"] else
                  "no agent running, no spool yet",
        "spool": {"path": str(path)},
        "dead_letters": raw.get("dead_letters", 0),
        "upstreams": upstreams,
    }
