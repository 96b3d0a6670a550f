"""The live event view (`outpost tail`, the status page's live panel): a bounded fan-out.

Ingest and the forwarders' upstream acks call ``TailHub.ingested`` / ``TailHub.acked``
(wired by the composition root); an ack is shown once the spool has recorded it. With
nobody watching, each is one truth test. With viewers, a request's events (an ack's
events) go into each interested viewer's queue in one bulk append: what a viewer is
shown is worked out later, on that viewer's own task
(``Viewer.take``), never on the ingest or forwarding path. A viewer that falls
``QUEUE`` messages (or ``QUEUE_BYTES`` of their bodies) behind loses the overflow,
counted, and is told how many.

At most ``MAX_VIEWERS`` are open at once, and a new viewer always gets a place: when
all are taken, it takes the place of the viewer whose stream has waited for its reader
the longest, else of the oldest (``TailHub.watch``). A place cannot tell a view that
reads from one that never will while nothing is sent, so a first-come rule let views
left open, or opened and never read, refuse the operator's next one for good; taking
the oldest's place is what the server does with connections (server/connections.py).
"""

from __future__ import annotations

import asyncio
import bisect
import operator
from collections import deque
from collections.abc import Callable, Sequence
from itertools import accumulate, count
from typing import Any

import orjson

from agent import logs
from agent.families.event import NUCLEUS, SEGMENT, Event
from agent.families.mapping import given_back, segment_given_back
from agent.families.nucleus import KNOWN_TYPES as NUCLEUS_TYPES
from agent.families.nucleus import event_type, old_name
from agent.families.segment import TYPES as SEGMENT_TYPES
from agent.logs import fingerprint
from agent.metrics import Metrics
from agent.spool.types import Row

QUEUE = 1000          # messages a viewer may fall behind before the overflow is dropped
QUEUE_BYTES = 8 * 1024 * 1024   # and the event bodies they may hold (an event: 500 KB at most)
MAX_VIEWERS = 4       # a few terminals and tabs; with RATE, bounds what viewers cost the loop
NAME_CHARS = 120      # enough to read an event name; the body itself is never shown

TAKE = 200            # messages summarised per write: a viewer's task yields between
RATE = 2000.0         # messages per second a viewer's task summarises, at most (see routes)

# Why a viewer's stream ends; the first two are counted (Metrics.tail_closed).
REPLACED = "replaced"   # a new viewer took its place
STALLED = "stalled"     # its stream waited too long for its reader (see routes)
STOPPING = "stopping"   # the agent is stopping

# An item waiting in a viewer's queue, summarised when taken: an ingested Event as it is
# (queued in bulk, no per-event work on the ingest path), else (kind, payload); an acked
# event's payload is (upstream, key, its stored row).
Item = Event | tuple[str, Any]


class Viewer:
    """One watcher: its key filter (a fingerprint, or None for all) and bounded queue."""

    def __init__(self, want: str | None, opened: int = 0) -> None:
        self.want = want
        self.opened = opened      # the order viewers were opened in
        self.queue: deque[Item] = deque()
        self.held = 0             # bytes of the event bodies in ``queue``
        self.dropped = 0          # dropped since the viewer was last told
        self.wake = asyncio.Event()
        # Why its stream is to end (REPLACED, STALLED, STOPPING); None while it is open.
        self.ended: str | None = None
        # Since when (CLOCK.elapsed_ms) a write to it waits for its reader; None when
        # none waits. Set by its stream (ops/tail_routes.py).
        self.writing_since: int | None = None

    def seniority(self) -> tuple[int, int]:
        """The order places are taken in: streams waiting for their reader first, the
        longest waiting first; then the oldest."""
        if self.writing_since is not None:
            return (0, self.writing_since)
        return (1, self.opened)

    def offer(self, item: Item) -> int:
        """Queue ``item`` (a note, no body); returns 1 if it was dropped (the viewer is
        ``QUEUE`` behind)."""
        if len(self.queue) >= QUEUE:
            self.dropped += 1
            return 1
        self.queue.append(item)
        self.wake.set()
        return 0

    def offer_events(self, events: Sequence[Event], resent: int) -> int:
        """Queue the events this viewer wants, and a note that ``resent`` of the request's
        events were already stored; returns how many messages were dropped."""
        want = self.want
        if want is not None:
            keys = {ev.key for ev in events}   # one, for nearly every request
            if len(keys) == 1:
                events = events if fingerprint(keys.pop()) == want else ()
            else:
                events = [ev for ev in events if fingerprint(ev.key) == want]
        if not events:
            return 0
        room = QUEUE - len(self.queue)   # sizes only of what may go in
        sizes = list(map(len, map(_BODY, events[:room] if room < len(events) else events)))
        return self.offer_many(events, sizes) + (self.offer(("resent", resent)) if resent else 0)

    def offer_many(self, items: Sequence[Item], sizes: list[int], more: int = 0) -> int:
        """Queue ``items`` (their bodies ``sizes`` bytes, given for as many as there is room
        for) in one bulk append, as many as there is room for in count and bytes, and
        ``more`` that were not even built (no viewer had room); returns how many were
        dropped."""
        room = min(len(items), QUEUE - len(self.queue))
        nbytes = sum(sizes[:room])
        if self.held + nbytes > QUEUE_BYTES:   # the longest prefix within the bytes left
            room = bisect.bisect_right(list(accumulate(sizes[:room])), QUEUE_BYTES - self.held)
            nbytes = sum(sizes[:room])
        self.queue.extend(items[:room] if room < len(items) else items)
        self.held += nbytes
        lost = len(items) - room + more
        self.dropped += lost
        self.wake.set()
        return lost

    def close(self, reason: str) -> None:
        """End the stream for ``reason``. What is queued is never shown now (``take``), so
        it goes at once: the stream may wait GRACE_S more for a reader that is behind
        (ops/tail_routes.py), and views replaced in a loop held QUEUE_BYTES apiece."""
        self.ended = reason
        self.queue.clear()
        self.held = 0
        self.wake.set()

    def take(self) -> list[dict[str, Any]] | None:
        """Up to ``TAKE`` queued messages, summarised, a drop notice first; None once the
        viewer has ended. The caller waits on ``wake`` first, and clears it."""
        if self.ended is not None:
            return None
        out: list[dict[str, Any]] = []
        if self.dropped:
            out.append({"kind": "dropped", "count": self.dropped})
            self.dropped = 0
        queue = self.queue
        for _ in range(min(TAKE, len(queue))):
            item = queue.popleft()
            self.held -= _size(item)
            out.append(summarise(item))
        if queue:
            self.wake.set()   # more to take, after the caller has written these
        return out


class TailHub:
    """Every viewer, and the totals that /status and /metrics show."""

    def __init__(self, metrics: Metrics) -> None:
        self.viewers: set[Viewer] = set()
        # tail_viewers, tail_dropped, tail_closed: shown in /status and /metrics
        self.metrics = metrics
        for reason in (REPLACED, STALLED):   # 0 until one is: a counter from the start
            metrics.tail_closed.setdefault(reason, 0)
        self.closed = False
        self._opened = count()

    def watch(self, key: str | None) -> Viewer | None:
        """A new viewer of fingerprint ``key`` (None: every key), in the place of the
        most senior one when all are taken; None once the hub is closed."""
        if self.closed:
            return None
        if len(self.viewers) >= MAX_VIEWERS:
            self.end(min(self.viewers, key=Viewer.seniority), REPLACED)
        viewer = Viewer(key, next(self._opened))
        self.viewers.add(viewer)
        self.metrics.tail_viewers = len(self.viewers)
        return viewer

    def end(self, viewer: Viewer, reason: str) -> None:
        """Close ``viewer`` for ``reason`` (REPLACED, STALLED), counted: its place is
        free at once, and its stream says why and ends."""
        self.leave(viewer)
        if viewer.ended is None:
            viewer.close(reason)
            self.metrics.tail_closed[reason] += 1

    def leave(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        self.metrics.tail_viewers = len(self.viewers)

    def close(self) -> None:
        """End every viewer's stream: at stop, open streams must not hold the server's
        graceful shutdown for its whole timeout."""
        self.closed = True
        for viewer in self.viewers:
            viewer.close(STOPPING)

    def ingested(self, events: Sequence[Event], stored: int) -> None:
        """Events committed by one request, ``stored`` of them new (the rest resends)."""
        if not self.viewers:
            return
        resent = len(events) - stored
        self.metrics.tail_dropped += sum(viewer.offer_events(events, resent)
                                         for viewer in self.viewers)

    def acked(self, upstream: str, key: str, rows: Sequence[Row],
              seqs: Sequence[int]) -> Callable[[], None] | None:
        """``upstream`` acknowledged events ``seqs`` of key ``key``, taken from ``rows``
        (the batch sent): what shows them to the viewers that want them, for the forwarder
        to call once the spool has recorded the ack (one not recorded is acknowledged
        again); None for nobody. Called by the forwarders on every ack: with nobody
        watching, it must cost no more than this first test."""
        if not self.viewers or not seqs:
            return None
        fp = fingerprint(key)
        viewers = [v for v in self.viewers if v.want is None or v.want == fp]
        if not viewers:
            return None
        if len(seqs) == len(rows):   # the whole batch: nothing refused or left unacked
            picked: Sequence[Row] = rows
        else:
            keep = set(seqs)
            picked = [row for row in rows if row.seq in keep]
        # Items only for what some viewer has room for: one far behind costs a count.
        room = max(QUEUE - len(viewer.queue) for viewer in viewers)
        items: list[Item] = [("acked", (upstream, key, row)) for row in picked[:room]]
        sizes = [len(row.body) for row in picked[:room]]
        more = len(picked) - len(items)

        def show() -> None:   # to the viewers still open by then
            self.metrics.tail_dropped += sum(viewer.offer_many(items, sizes, more)
                                             for viewer in viewers if viewer in self.viewers)
        return show


_BODY = operator.attrgetter("body")


def _size(item: Item) -> int:
    """The bytes of the event body a queued item holds (none for a note)."""
    if isinstance(item, Event):
        return len(item.body)
    kind, payload = item
    return len(payload[2].body) if kind == "acked" else 0


def summarise(item: Item) -> dict[str, Any]:
    """What a viewer is shown of one queued item."""
    if isinstance(item, Event):
        return {"kind": "ingested", **describe(item)}
    kind, payload = item
    if kind == "acked":
        upstream, key, row = payload
        shown = _describe(*as_sent(row.family, orjson.loads(row.body), row.received), key)
        del shown["warnings"]   # shown once, when it came in
        return {"kind": kind, "upstream": upstream, **shown}
    return {"kind": kind, "count": payload}


def as_sent(family: int, body: dict[str, Any], received: int) -> tuple[int, dict[str, Any]]:
    """A stored event as its app sent it: one stored mapped to the other family (its key
    routed to an upstream of that family) is the event it was, as its ingest line showed
    it: one the mapping gives back exactly (``mapping.given_back`` for a Nucleus event,
    its ``nucleus-`` messageId the cheap first test; ``segment_given_back`` for a Segment
    event, its `payload.$segment`)."""
    if family == SEGMENT and str(body.get("messageId", "")).startswith("nucleus-"):
        back = given_back(body, received)
        if back is not None:   # else a Segment app's event that only looks like one
            return NUCLEUS, back
    elif family == NUCLEUS:
        back = segment_given_back(body, received)
        if back is not None:   # else a Nucleus app's own `$segment` payload key
            return SEGMENT, back
    return family, body


def describe(ev: Event) -> dict[str, Any]:
    """An event's API family, key fingerprint, type, name, id and warnings; never its
    body, whose properties may hold anything an app sends."""
    # A new key is registered for redaction once its commit is announced, in a turn of
    # the loop after the one that wakes an idle viewer: the key a first event's id or name
    # holds was shown whole. A key registered already costs one set lookup.
    logs.register_secret(ev.key)
    return _describe(ev.family, orjson.loads(ev.body), ev.key)


def _describe(family: int, body: dict[str, Any], key: str) -> dict[str, Any]:
    kind: Any
    if family == NUCLEUS:
        kind = event_type(body)
        name, ident, known = body.get("name"), body.get("id"), NUCLEUS_TYPES
        if name is None:
            name = old_name(body)
    else:
        kind = body.get("type")
        name = body.get("event") if kind == "track" else body.get("name")
        ident, known = body.get("messageId"), SEGMENT_TYPES
    # The type needs no redaction when it is one the API defines.
    shown = kind if kind in known else _text(kind)
    return {"api": "nucleus" if family == NUCLEUS else "segment", "key": fingerprint(key),
            "type": shown, "name": _text(name), "id": _text(ident),
            "warnings": warnings(family, body, kind, name, known)}


def warnings(family: int, body: dict[str, Any], kind: Any, name: Any,
             known: frozenset[str]) -> list[str]:
    """What the agent accepted but an operator may want to fix in the app, its type and
    name given. Read off the stored event (ingest completes events as the APIs do; the
    tail changes nothing)."""
    out = []
    if kind not in known:
        out.append(f"unknown type {_text(kind)!r}")
    if family == NUCLEUS:
        if kind == "event" and not name:
            out.append("missing field `name`")
    else:
        if kind == "track" and not name:
            out.append("missing field `event`")
        if not body.get("userId") and not body.get("anonymousId"):
            out.append("missing field `userId` or `anonymousId`")
        # Ingest gives an event with no time of its own the receive time (docs/mapping.md).
        if body.get("originalTimestamp") is None and body.get("timestamp") == body.get(
                "receivedAt"):
            out.append("no `timestamp`: defaulted to the time it was received")
    return out


def _text(value: Any) -> str | None:
    """A field as shown: clipped, and with any registered secret redacted."""
    if value is None:
        return None
    return logs.redacted_head(str(value), NAME_CHARS)
