"""Choosing the uplink class for an upstream's protocol."""

from __future__ import annotations

import aiohttp

from agent.settings import UpstreamConfig
from agent.uplinks.base import Uplink
from agent.uplinks.nucleus_http import NucleusHttpUplink
from agent.uplinks.nucleus_ws import NucleusWsUplink
from agent.uplinks.segment_http import SegmentHttpUplink


def make_uplink(cfg: UpstreamConfig, app_key: str, session: aiohttp.ClientSession,
                machine_id: str) -> Uplink:
    if cfg.protocol == "nucleus-ws":
        return NucleusWsUplink(cfg, app_key, session, machine_id)
    if cfg.protocol == "nucleus-http":
        return NucleusHttpUplink(cfg, app_key, session)
    if cfg.protocol == "segment-http":
        return SegmentHttpUplink(cfg, app_key, session)
    raise ValueError(f"upstream {cfg.name}: protocol {cfg.protocol!r} is not supported")


def window(cfg: UpstreamConfig) -> int:
    """Batches in flight at once: pipelined over a websocket, one at a time over HTTP
    so that batches reach the upstream in order (FIFO per key)."""
    return cfg.max_in_flight if cfg.protocol == "nucleus-ws" else 1
