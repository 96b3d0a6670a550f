"""UPLINKS: every upstream protocol the agent speaks, one line each.

Each line names the protocol, the URL schemes it accepts, the class that speaks it, as
``module:Class``, and the keys it cannot send as they are (sent_keys). Config validation
reads the names, schemes and key rules without importing
the classes (and aiohttp with them, a tenth of a second): `outpost check-config`,
`status` and the other operator commands start in a third of the time. The forwarder
(which class, how many batches in flight) and `outpost doctor` (``probe``) import a
class when they first ask for it. Adding a protocol is its module plus one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from agent.settings import UpstreamConfig
from agent.uplinks.sent_keys import KeyProblem, any_key, basic_username, path_segment

if TYPE_CHECKING:   # the classes, and aiohttp with them, are imported on first use
    import aiohttp

    from agent.uplinks.base import Uplink, UplinkBase


@dataclass(frozen=True)
class Protocol:
    name: str                   # `protocol` in agent.toml
    schemes: tuple[str, ...]    # the URL schemes it accepts
    speaker: str                # "module:Class", the UplinkBase subclass that speaks it
    # Why a key cannot be sent as it is (agent/uplinks/sent_keys.py).
    key_problem: KeyProblem = any_key

    def uplink_class(self) -> type[UplinkBase]:
        module, _, name = self.speaker.partition(":")
        return cast("type[UplinkBase]", getattr(importlib.import_module(module), name))


UPLINKS: tuple[Protocol, ...] = (
    Protocol("nucleus-ws", ("ws", "wss"), "agent.uplinks.nucleus_ws:NucleusWsUplink",
             path_segment),
    Protocol("nucleus-http", ("http", "https"), "agent.uplinks.nucleus_http:NucleusHttpUplink",
             path_segment),
    Protocol("segment-http", ("http", "https"), "agent.uplinks.segment_http:SegmentHttpUplink",
             basic_username),
)


def protocols() -> tuple[str, ...]:
    """The `protocol` values agent.toml accepts."""
    return tuple(p.name for p in UPLINKS)


def protocol(name: str) -> Protocol:
    """The line for ``name`` (config has already refused unknown ones)."""
    for p in UPLINKS:
        if p.name == name:
            return p
    raise ValueError(f"protocol {name!r} is not supported")


def over_websocket(name: str) -> bool:
    """Whether protocol ``name`` sends its batches as websocket frames, not requests."""
    return any(p.name == name and "ws" in p.schemes for p in UPLINKS)


def uplink_class(name: str) -> type[UplinkBase]:
    """The class serving protocol ``name``."""
    return protocol(name).uplink_class()


def make_uplink(cfg: UpstreamConfig, app_key: str, session: aiohttp.ClientSession,
                machine_id: str) -> Uplink:
    """A new uplink for one local key."""
    return uplink_class(cfg.protocol)(cfg, app_key, session, machine_id)
