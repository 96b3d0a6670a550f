"""The status snapshot behind GET /status, `outpost status` and the status page."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from . import __version__
from .config import Config
from .metrics import Metrics
from .routing import Forwarding
from .spool import Spool


async def snapshot(cfg: Config, spool: Spool, forwarding: Forwarding,
                   metrics: Metrics) -> dict[str, Any]:
    oldest = await spool.oldest_received()
    upstreams = []
    for up in cfg.upstreams:
        state = forwarding.states[up.name]
        keys = [k for k in spool.streams if cfg.route(k) is up]
        upstreams.append({
            **dataclasses.asdict(state),
            "url": up.url,
            "queue_depth": sum(spool.streams[k].depth for k in keys),
            "queue_bytes": sum(spool.streams[k].bytes for k in keys),
            "keys": len(keys),
        })
    unrouted = forwarding.unrouted_keys()
    return {
        "version": __version__,
        "uptime_s": round(time.time() - metrics.started, 1),
        "queue_depth": spool.depth,
        "spool": {"path": str(spool.path), "used_bytes": spool.used_bytes,
                  "max_bytes": spool.max_bytes},
        "oldest_event_age_s": round(time.time() - oldest / 1000, 1) if oldest else None,
        "upstreams": upstreams,
        "unrouted": {"keys": len(unrouted),
                     "queue_depth": sum(spool.streams[k].depth for k in unrouted)},
        "counters": dict(sorted(spool.counters.items())),
        "history": metrics.series(),
    }
