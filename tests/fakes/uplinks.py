"""Uplinks that need no upstream: NullUplink, a protocol as small as one can be, and
``as_prepared`` for the scripted uplinks some forwarder tests drive directly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import orjson

from agent.families.event import NUCLEUS
from agent.settings import UpstreamConfig
from agent.spool.types import Row
from agent.uplinks.base import Acked, SendResult, UplinkBase
from agent.uplinks.prepare import Prepared


class NullUplink(UplinkBase):
    """`protocol = "null"`: acknowledges every event at once, and keeps what it was sent.

    Everything a new protocol needs is here; tests/test_uplink_registry.py adds it
    to the registry (one line) and the agent uses it like any other.
    """

    family: ClassVar[int] = NUCLEUS
    sent: ClassVar[list[bytes]] = []   # every body sent, by every instance (tests reset it)

    def encode_stored(self, row: Row) -> tuple[bytes, Any]:
        return bytes(row.body), row.seq

    def encode_mapped(self, event: dict[str, Any], row: Row) -> tuple[bytes, Any]:
        return orjson.dumps(event), row.seq

    async def send(self, prepared: Prepared) -> SendResult:
        NullUplink.sent.extend(prepared.bodies)
        return Acked(prepared.seqs)

    @classmethod
    def probe(cls, cfg: UpstreamConfig) -> str:
        return "nothing to reach: the null protocol acknowledges every event"


def as_prepared(rows: Sequence[Row]) -> Prepared:
    """``rows`` as one batch, bodies as stored, acknowledged by seq."""
    seqs = tuple(r.seq for r in rows)
    return Prepared(tuple(rows), seqs, tuple(r.body for r in rows), seqs, ())
