"""The Nucleus wire format both Nucleus uplinks share: `{"data": [...]}` frames, acks by id.

Stored Nucleus bodies are spliced into the frame as they are (no re-encoding).
Each event's `id` must be unique among the unacknowledged events of the
connection, because the ack carries nothing else; events without an id get
their spool seq as id.
"""

from __future__ import annotations

from itertools import repeat
from typing import Any, ClassVar, cast
from urllib.parse import quote

import orjson
from yarl import URL

from agent.families.event import NUCLEUS, Limit, compact_json
from agent.settings import UpstreamConfig
from agent.spool.types import Row
from agent.uplinks.prepare import Prepared

# Reported ids looked up as they are (a bool or a container never is: see match).
_PLAIN = frozenset({int, float, str})
_HEAD, _TAIL = b'{"data":[', b"]}"
# The largest message a Nucleus upstream takes: another Outpost's, whose route takes an
# HTTP body, or a websocket message read whole, of 4 MiB at most (a longer one: 413, or
# only the events of its first 2 MiB taken, so an event alone past them never is).
MAX_MESSAGE = 4 * 1024 * 1024
# What encode_stored adds to an event stored without an `id`: `,"id":` and its spool seq.
_ID_BYTES = len(b',"id":') + len(str(2**63 - 1))


def track_url(base: str, key: str) -> URL:
    """`{base}/app/{key}/track`, the key one escaped path segment: an app id holding `?`,
    `#` or `/` (any printable key is accepted) must not cut the path short or add to it.
    Sent as built (encoded): from a string, yarl unescaped what a path may hold as it is,
    `;` included, which servlet containers (and proxies matching paths as they do) read
    as the start of a segment's parameters: `/app/a;b/track` was app `a`'s path there,
    and `/app/..;/track` was `/track`."""
    url = URL(base)
    return url.with_path(f"{url.raw_path.rstrip('/')}/app/{quote(key, safe='')}/track",
                         encoded=True)


class NucleusFraming:
    """Encoders for prepare.py's take loop, and the frame around a prepared batch."""

    family: ClassVar[int] = NUCLEUS
    envelope_bytes: ClassVar[int] = len(b'{"data":[]}')
    event_overhead: ClassVar[int] = 1   # the comma

    @classmethod
    def event_limit(cls, cfg: UpstreamConfig) -> Limit:
        """An event alone in its frame, its `id` given, must fit in one message: past it,
        it was acknowledged at ingest, then refused by the upstream at every send."""
        return Limit(NUCLEUS, MAX_MESSAGE - cls.envelope_bytes,
                     f"{cfg.protocol} sends a message of at most {MAX_MESSAGE} bytes, "
                     "`{\"data\":[]}` and the event's `id` included", _ID_BYTES)

    def encode_stored(self, row: Row) -> tuple[bytes, Any]:
        ev = orjson.loads(row.body)
        if not isinstance(ev, dict):
            raise ValueError("stored event is not an object")
        if ev.get("id") is not None:
            return bytes(row.body), ev["id"]
        ev["id"] = row.seq
        return compact_json(ev), row.seq

    def encode_mapped(self, event: dict[str, Any], row: Row) -> tuple[bytes, Any]:
        # A Nucleus event given back from its Segment form (stored mapped at ingest, then
        # routed to a Nucleus upstream) keeps its own id, as it would stored as it came.
        # Right-sized bodies (compact_json): a batch keeps them until it is answered.
        if event.get("id") is not None:
            return compact_json(event), event["id"]
        event["id"] = row.seq
        return compact_json(event), row.seq


def frame(prepared: Prepared) -> bytes:
    """`{"data":[...]}` around the bodies by one join: the only copy of the whole (each
    ``+`` of a frame of a few hundred KB copied all of it again)."""
    bodies = prepared.bodies
    # head, body, comma, body, ..., tail (just head and tail when there are no bodies)
    parts = [b","] * max(2 * len(bodies) + 1, 2)
    parts[0], parts[-1] = _HEAD, _TAIL
    parts[1:-1:2] = bodies
    return b"".join(parts)


def ids_only(reported: list[Any]) -> bool:
    """Whether every entry of a `reportedIds` list could be an event id (a string or a
    number). A list holding anything else (an object: another dialect's acks; an array,
    null, a boolean) is malformed: it acknowledges the ids it holds, and says nothing of
    the events it leaves out."""
    return _PLAIN.issuperset(map(type, reported))


def match(in_flight: dict[Any, int], reported: Any,
          also: dict[Any, int] | None = None, plain: bool | None = None) -> list[int]:
    """Seqs acknowledged by a `reportedIds` list, taken out of ``in_flight`` (ack id ->
    seq), and their ids out of ``also`` too; unknown ids are ignored. ``plain``: what
    ids_only said of ``reported``, when the caller asked it already (a pass over every id)."""
    if not isinstance(reported, list):
        return []
    if ids_only(reported) if plain is None else plain:
        # The usual reply: every id a plain string or number, taken out at C speed; the
        # filter for unknown ids (a miss leaves the dict as it was) only if there were any.
        before = len(in_flight)
        popped = list(map(in_flight.pop, reported, repeat(None)))
        if before - len(in_flight) == len(popped):
            if also is not None:
                list(map(also.pop, reported, repeat(None)))
            return cast(list[int], popped)  # each pop took one out: no None among them
        hits = [(ack_id, s) for ack_id, s in zip(reported, popped) if s is not None]
        if also is not None:
            for ack_id, _ in hits:
                also.pop(ack_id, None)
        return [s for _, s in hits]
    acked = []
    for ack_id in reported:
        # No event has a boolean id (ingest refuses them), but `true == 1` in Python:
        # a stray `true` must not acknowledge the event whose id is 1.
        if isinstance(ack_id, (dict, list, bool)):
            continue
        seq = in_flight.pop(ack_id, None)
        if seq is not None:
            acked.append(seq)
            if also is not None:
                also.pop(ack_id, None)
    return acked
