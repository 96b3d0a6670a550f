"""The canonical stored event, dedupe keys and time helpers.

An Event keeps the body in its own API family's shape (Nucleus or Segment):
forwarding within a family is then lossless. Mapping across families happens
once: at ingest for a Nucleus event routed to a Segment upstream (stored mapped,
agent/server/limits.py), else at send time (see ``agent/families/mapping.py``).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections import Counter
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import compress, repeat
from typing import Any, NamedTuple, overload

import orjson

from agent.clock import CLOCK
from agent.families.lanes import NORMAL

NUCLEUS = 0
SEGMENT = 1
FAMILIES = (NUCLEUS, SEGMENT)
# Event.ack_id of an event whose id nobody read at ingest.
NOT_READ: Any = object()


@dataclass(slots=True)
class Event:
    """One event ready for the spool."""

    key: str        # the app id or write key: routes the event and keeps FIFO per key
    family: int     # NUCLEUS or SEGMENT: the shape of ``body``
    dedupe: int     # signed 64-bit hash identifying resends of the same event
    body: bytes     # compact JSON of the event, enriched, as it will be forwarded
    # Nucleus: the `id` its upstream acknowledges it by (None: it has none), read where
    # ingest parsed the event, and stored beside the body (spool/records.py), so that
    # sending it needs no second parse.
    ack_id: Any = NOT_READ
    lane: int = NORMAL   # families/lanes.py: HIGH goes first; set at ingest
    # Nucleus, when its key's events are mapped at ingest: the event as ingest parsed it
    # (``body`` is its encoding), which the mapping reads instead of parsing the body
    # again, and drops (server/limits.py, as_stored).
    parsed: dict[str, Any] | None = None


class Columns(Sequence[Event]):
    """A batch's events of one family as parallel columns, as the batch accept loops fill
    them (appending to a column each): making an Event an event was ~3.6k instructions
    (callgrind), and the writer took the fields back out of the Events (spool/writer.py,
    ``Usual``), which takes the columns as they are. Read as a Sequence it gives Events,
    each made at its read, for whatever needs one (a resend, several keys, the live view).
    A mapped key's Nucleus events stay Events: each keeps its parsed event (Event.parsed).
    The columns are not changed once the request hands them on. Asked for by
    ``type(x) is Columns``: as a Sequence it is an ABC, and ``isinstance`` on it a Python
    call (ABCMeta.__instancecheck__), more than the test itself."""

    __slots__ = ("family", "key", "keys", "dedupes", "bodies", "ids", "lanes", "most")

    def __init__(self, family: int, key: str, *, by_event_keys: bool = False) -> None:
        self.family = family
        self.key = key   # every event's key, when ``keys`` is None
        self.keys: list[str] | None = [] if by_event_keys else None
        self.dedupes: list[int] = []
        self.bodies: list[bytes] = []
        # Nucleus: the ids read at ingest (Event.ack_id); None: no event's was read.
        self.ids: list[Any] | None = [] if family == NUCLEUS else None
        self.lanes: list[int] = []
        # No body is longer: a bound its maker knows (stored as sent, the request's length
        # and what is added), so that longer_than needs no pass over the bodies.
        self.most = sys.maxsize

    def __len__(self) -> int:
        return len(self.bodies)

    def __iter__(self) -> Iterator[Event]:
        return map(Event, repeat(self.key) if self.keys is None else self.keys,
                   repeat(self.family), self.dedupes, self.bodies,
                   repeat(NOT_READ) if self.ids is None else self.ids, self.lanes)

    @overload
    def __getitem__(self, i: int) -> Event: ...
    @overload
    def __getitem__(self, i: slice) -> Columns: ...

    def __getitem__(self, i: int | slice) -> Event | Columns:
        if isinstance(i, slice):
            return self._part(lambda column: column[i])
        return Event(self.key if self.keys is None else self.keys[i], self.family,
                     self.dedupes[i], self.bodies[i],
                     NOT_READ if self.ids is None else self.ids[i], self.lanes[i])

    def without(self, known: Container[int]) -> Columns:
        """The events whose dedupe key is not ``known`` (no Event made for each)."""
        keep = [k not in known for k in self.dedupes]
        return self._part(lambda column: list(compress(column, keep)))

    def _part(self, of: Callable[[list[Any]], list[Any]]) -> Columns:
        """The events ``of`` picks out of each column."""
        part = Columns(self.family, self.key)
        part.keys = None if self.keys is None else of(self.keys)
        part.dedupes, part.bodies, part.lanes = of(self.dedupes), of(self.bodies), of(self.lanes)
        part.ids = None if self.ids is None else of(self.ids)
        part.most = self.most
        return part

    def key_set(self) -> set[str]:
        """The keys the events name."""
        return {self.key} if self.keys is None else set(self.keys)


def longer_than(events: Sequence[Event], least: int) -> bool:
    """Whether any body among ``events`` is longer than ``least``: a Columns' answered by
    its bound when that is enough (two passes over a batch's bodies, each length past 256
    a new int, were ~1.3k instructions an event, callgrind), else read from its column with
    no Event made. A lone event (a single call) is measured alone, and ``max`` is called
    without ``default`` (its keyword's parsing cost more than the rest, callgrind)."""
    if type(events) is Columns:
        return events.most > least and bool(events.bodies) \
            and max(map(len, events.bodies)) > least
    if len(events) == 1:
        return len(events[0].body) > least
    return bool(events) and max([len(ev.body) for ev in events]) > least


def keys_of(events: Sequence[Event]) -> set[str]:
    """The keys ``events`` name (Columns: no Event made for each)."""
    return events.key_set() if type(events) is Columns else {ev.key for ev in events}


def key_counts(events: Sequence[Event]) -> Counter[str]:
    """How many of ``events`` each key names (Columns: no Event made for each)."""
    if type(events) is not Columns:
        return Counter(ev.key for ev in events)
    if events.keys is None:
        return Counter({events.key: len(events)})
    return Counter(events.keys)


class Limit(NamedTuple):
    """The largest event an upstream can ever carry: ``max_bytes`` of its body in
    ``family``'s shape, as sent, and what sets that limit (said in the refusal).
    ``id_bytes``: the most its uplink adds to an event that has no `id` (a Nucleus one
    gives it its spool seq), counted against the limit for such an event."""

    family: int
    max_bytes: int
    source: str
    id_bytes: int = 0

    def refuses(self, upstream: str, size: int) -> str | None:
        """Why an event body of ``size`` bytes can never go to ``upstream``, or None."""
        if size <= self.max_bytes:
            return None
        # The limit first: a websocket close carries only 123 bytes of reason.
        return (f"event too large for upstream {upstream!r} ({self.source}): {size} bytes, "
                f"{self.max_bytes} fit")


# compact_json's option: hot loops that inline it (one call fewer an event, ~600
# instructions) write ``orjson.dumps(obj, option=NEWLINE)[:-1]`` as it does.
NEWLINE = orjson.OPT_APPEND_NEWLINE


def compact_json(obj: Any) -> bytes:
    """``orjson.dumps(obj)``, copied into a right-sized buffer, for bytes that are kept.

    orjson (3.12 on) hands back its whole working buffer, 4 KiB or more, however short
    the JSON: a 100-byte event body held 4 KiB until its commit, so one 4 MiB Nucleus
    post of 38,000 events held 150 MB, and the freed holes fragmented the heap after.
    The copy is the slice that drops a newline orjson appends: one call fewer than a
    memoryview's copy (~1k instructions an event, callgrind).
    """
    return orjson.dumps(obj, option=NEWLINE)[:-1]


# Copied for each key: building a hasher (its keyword arguments parsed) cost more than
# the hashing (callgrind: 8.5k instructions a key, 6.7k with the copy).
_KEY_HASH = hashlib.blake2b(digest_size=8)
# A digest read as a big-endian signed int64: half the instructions of int.from_bytes,
# whose keyword argument is parsed at every call.
_SIGNED = struct.Struct(">q").unpack


def dedupe_key(*parts: Any) -> int:
    """A stable signed 64-bit hash of ``parts`` (fits an SQLite INTEGER)."""
    h = _KEY_HASH.copy()
    h.update(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS))
    key: int = _SIGNED(h.digest())[0]
    return key


def key_head(*head: Any) -> hashlib.blake2b:
    """A hasher holding the first parts (at least one) of dedupe keys that differ only
    in their last, a string: ``dedupe_key_after(key_head(*head), last)`` is
    ``dedupe_key(*head, last)``. A batch's messages share their family and key: their
    JSON hashed once a request saved ~0.5-0.9k instructions an event (callgrind)."""
    h = _KEY_HASH.copy()
    h.update(orjson.dumps(head, option=orjson.OPT_SORT_KEYS)[:-1] + b",")   # `[a,b,`
    return h


def dedupe_key_after(head: hashlib.blake2b, last: str) -> int:
    """``dedupe_key`` of ``head``'s parts and ``last``: the same bytes hashed, in two
    pieces (a string's JSON is the same alone as in an array)."""
    h = head.copy()
    h.update(orjson.dumps(last))
    h.update(b"]")
    key: int = _SIGNED(h.digest())[0]
    return key


# The wall clock in epoch milliseconds (possibly wrong: see agent/clock.py). The method
# itself, not a function calling it: a Python call less at each of a request's reads.
now_ms = CLOCK.wall_ms


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as an ISO 8601 UTC string with millisecond precision."""
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    # %Y does not pad a year before 1000 to four digits: "999-01-01" is no ISO 8601 date.
    return f"{dt.year:04d}" + dt.strftime("-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
