"""UPLINKS: every upstream protocol the agent speaks, one line each.

Config validation (`protocol`, the URL's scheme), the forwarder (which class,
how many batches in flight) and `outpost doctor` (``probe``) all read this
tuple when they run, so adding a protocol is its module plus one line here.
"""

from __future__ import annotations

import aiohttp

from agent.settings import UpstreamConfig
from agent.uplinks.base import Uplink, UplinkBase
from agent.uplinks.nucleus_http import NucleusHttpUplink
from agent.uplinks.nucleus_ws import NucleusWsUplink
from agent.uplinks.segment_http import SegmentHttpUplink

UPLINKS: tuple[type[UplinkBase], ...] = (
    NucleusWsUplink,
    NucleusHttpUplink,
    SegmentHttpUplink,
)


def protocols() -> tuple[str, ...]:
    """The `protocol` values agent.toml accepts."""
    return tuple(cls.protocol for cls in UPLINKS)


def uplink_class(protocol: str) -> type[UplinkBase]:
    """The class serving ``protocol`` (config has already refused unknown ones)."""
    for cls in UPLINKS:
        if cls.protocol == protocol:
            return cls
    raise ValueError(f"protocol {protocol!r} is not supported")


def make_uplink(cfg: UpstreamConfig, app_key: str, session: aiohttp.ClientSession,
                machine_id: str) -> Uplink:
    """A new uplink for one local key."""
    return uplink_class(cfg.protocol)(cfg, app_key, session, machine_id)
