"""The Segment spec, shared by every Segment-like dialect (docs/mapping.md).

MetaRouter/Segment, the capture API, Tranthor and SegmentStream all store
their events in the Segment family shape. This module validates one message
and completes it the same way for all of them:

- `type` is one of track/identify/page/screen/group/alias (each dialect narrows it);
- `userId` or `anonymousId` is required (JSON null or "" counts as missing);
- track needs `event`, group `groupId`, alias `previousId`;
- `messageId` is a string under 100 characters, generated (uuid4) when absent;
- `timestamp`, `originalTimestamp` and `sentAt` must read as ISO 8601 dates, in a message
  or at the batch level: a message is refused naming the field, never forwarded as sent
  for the upstream to drop later, and never rewritten;
- batch-level `context` and `integrations` are merged in (the event's own keys win), and a
  batch-level `timestamp` is the `timestamp` of each message that has no time of its own;
- `writeKey` and `sentAt` are transport fields: the key becomes the Event's key,
  and `sentAt` is set afresh at every send, so neither is stored;
- `receivedAt` is set at ingest, and `timestamp` too when the client sent neither
  `timestamp` nor `originalTimestamp`, so an event forwarded days later keeps its time.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from agent.families.dates import iso_ms_fast
from agent.families.depth import SHALLOW_BYTES, may_be_too_deep, too_deep
from agent.families.errors import Invalid, shown
from agent.families.event import (
    NEWLINE,
    NOT_READ,
    SEGMENT,
    Event,
    dedupe_key,
    dedupe_key_after,
    key_head,
    now_ms,
)
from agent.families.lanes import HIGH, NORMAL, SEGMENT_HIGH
from agent.families.lifecycle import SEGMENT_NEEDS_FACTS

if TYPE_CHECKING:   # the enrichment asks the mapping, which reads these rules
    from agent.families.enrich import Enrich

TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias"})
REQUIRED = {"track": "event", "group": "groupId", "alias": "previousId"}
OBJECT_FIELDS = ("properties", "traits", "context", "integrations")
_OBJECT_OR_NONE = frozenset({dict, type(None)})   # exact types
TIME_FIELDS = ("timestamp", "originalTimestamp")
DATE_FIELDS = (*TIME_FIELDS, "sentAt")
# The limits real clients are written against (as seen on the wire): Segment's 32 KB per
# event; per batch, RudderStack's 4 MiB, what rudder-sdk-python fills a batch of 100
# messages up to (Segment's SDKs stay under 500 KB). A batch refused 413 is dropped whole
# by the client: all its messages lost.
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_BATCH_EVENTS = 2500
MAX_MESSAGE_ID = 99
MAX_MERGE_DEPTH = 16
EMPTY: Mapping[int, str] = MappingProxyType({})
# The date forms clients write: RFC 3339's (its space for the `T` too), a bare date, no
# seconds, no zone, an offset without its colon (old iOS SDKs). fromisoformat alone reads
# more (any separator, week dates, the basic format, offsets with seconds), which is then
# forwarded as sent to upstreams, and JavaScript's Date, that cannot read it.
_DATE_FORM = re.compile(r"\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:\.\d+)?)?"
                        r"(?:Z|[+-]\d\d:?\d\d)?)?", re.ASCII).fullmatch
# Bound once: looked up on the class at each call, it was a new bound method every time
# (~600 instructions of each date checked, callgrind).
_from_iso = datetime.fromisoformat
# toISOString's separators, `--T::.`, as one slice made once.
_SEPARATORS = slice(4, 20, 3)


def _read_date(value: Any) -> None:
    """Raise ValueError unless ``value`` is a date in a form above (TypeError: not a string)."""
    if _DATE_FORM(value) is None:
        raise ValueError(value)
    _from_iso(value)   # the form, and a real date: not month 13, say


def is_date(value: Any) -> bool:
    """Whether ``value`` is a date ``check`` takes: JavaScript's toISOString (what most
    clients send) by its form and fromisoformat, without a regular expression, or any
    form above."""
    if type(value) is str and len(value) == 24 and value[23] == "Z" \
            and value[_SEPARATORS] == "--T::.":
        try:
            _from_iso(value)
        except ValueError:
            return False
        return True
    try:
        _read_date(value)
    except (TypeError, ValueError):
        return False
    return True


def is_id(value: Any) -> bool:
    """A usable id: a non-empty string or a number (clients stringify inconsistently)."""
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What ``check`` read of a valid message, that its caller reads nothing twice: its
# `type`, a track's `event` (None for other types), its `messageId` (None: absent), and
# whether it has neither `timestamp` nor `originalTimestamp`. A plain tuple: a NamedTuple's
# constructor is a Python call for every message.
Checked = tuple[str, "str | None", "str | None", bool]


def check(ev: Any, types: frozenset[str], need_message_id: bool = False) -> Checked:
    """Raise Invalid naming the first problem with message ``ev`` (not changed)."""
    if not isinstance(ev, dict):
        raise Invalid("each message must be a JSON object")
    kind = ev.get("type")
    if not isinstance(kind, str) or kind not in types:
        got = repr(kind) if kind is None or type(kind) is str else shown(kind)
        raise Invalid(f"`type` must be one of {', '.join(sorted(types))}, got {got}")
    user, anon = ev.get("userId"), ev.get("anonymousId")
    # The usual message (a non-empty string userId, anonymousId absent or a string) passes
    # both checks below: every message of a batch asks (bench/RESULTS.md, run 10).
    if not (type(user) is str and user and (anon is None or type(anon) is str)):
        for name, value in (("userId", user), ("anonymousId", anon)):
            if value is not None and value != "" and not is_id(value):
                raise Invalid(f"`{name}` must be a string")
        if not is_id(user) and not is_id(anon):
            raise Invalid("`userId` or `anonymousId` is required")
    required = REQUIRED.get(kind)
    if required is not None:
        needed = ev.get(required)
        if not (type(needed) is str and needed) and (  # the usual value passes at once
                not is_id(needed) or (required == "event" and not isinstance(needed, str))):
            raise Invalid(f"{kind} needs `{required}` (a non-empty string)")
    # Fields by name, not by a loop over the names: a loop's iterator is a malloc for
    # every message (callgrind). The usual objects (absent, or objects) pass at once.
    if not (type(ev.get("properties")) in _OBJECT_OR_NONE
            and type(ev.get("traits")) in _OBJECT_OR_NONE
            and type(ev.get("context")) in _OBJECT_OR_NONE
            and type(ev.get("integrations")) in _OBJECT_OR_NONE):
        for name in OBJECT_FIELDS:
            value = ev.get(name)
            if value is not None and not isinstance(value, dict):
                raise Invalid(f"`{name}` must be an object")
    value = ev.get("name")
    if value is not None and not isinstance(value, str):
        raise Invalid("`name` must be a string")
    timestamp, original, sent = ev.get("timestamp"), ev.get("originalTimestamp"), ev.get("sentAt")
    try:   # check_dates, without a call for each message
        # JavaScript's toISOString (what most clients send) by its separators in one
        # slice, its digits by fromisoformat: no call of _read_date (~2k instructions an
        # event, callgrind). A string first: an object of 24 members has no item 23.
        if timestamp is not None and not (type(timestamp) is str and len(timestamp) == 24
                                          and timestamp[23] == "Z"
                                          and timestamp[_SEPARATORS] == "--T::."
                                          and _from_iso(timestamp)):
            _read_date(timestamp)
        if original is not None:
            _read_date(original)
        if sent is not None:
            _read_date(sent)
    except (TypeError, ValueError):
        check_dates(ev)   # raises, naming the first that is not a date
    message_id = ev.get("messageId")
    if message_id is None:
        if need_message_id:
            raise Invalid("`messageId` is required")
    elif not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_MESSAGE_ID:
        raise Invalid(f"`messageId` must be a string of 1 to {MAX_MESSAGE_ID} characters")
    # A checked track's `event` is a string.
    return (kind, needed if required == "event" else None, message_id,
            timestamp is None and original is None)


def check_dates(obj: dict[str, Any]) -> None:
    """Raise Invalid naming the first of `timestamp`, `originalTimestamp`, `sentAt` in
    ``obj`` (a message or a batch) that is not an ISO 8601 date string (null is absent)."""
    get = obj.get
    for name in DATE_FIELDS:
        value = get(name)
        if value is None:
            continue
        try:
            # Only checked, never rewritten. A value that is not a string: TypeError.
            _read_date(value)
        except (TypeError, ValueError):
            raise Invalid(f"`{name}` must be an ISO 8601 date string, as "
                          f"2026-01-15T10:20:30.123Z, got {shown(value)}") from None


def merge(base: dict[str, Any], own: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """``own`` over ``base``, recursively for nested objects: the event's keys win."""
    out = dict(base)
    for name, value in own.items():
        old = out.get(name)
        if isinstance(old, dict) and isinstance(value, dict) and depth < MAX_MERGE_DEPTH:
            out[name] = merge(old, value, depth + 1)
        else:
            out[name] = value
    return out


class Shared(NamedTuple):
    """What a request gives each of its messages, read once per request: the receive
    time, and a batch's non-empty `context` and `integrations` (merged into each message)
    and its `timestamp` (a string, or None); and the `messageId`s completion made for its
    messages, never the name of one refused (``where``)."""

    received: str
    merged: tuple[tuple[str, dict[str, Any]], ...]
    timestamp: str | None
    made: set[str]


def shared(received: str, batch: dict[str, Any] | None = None) -> Shared:
    if batch is None:
        return Shared(received, (), None, set())
    merged = []
    for name in ("context", "integrations"):
        value = batch.get(name)
        if isinstance(value, dict) and value:
            merged.append((name, value))
    timestamp = batch.get("timestamp")
    return Shared(received, tuple(merged), timestamp if isinstance(timestamp, str) else None,
                  set())


def complete(ev: dict[str, Any], given: Shared, message_id: str | None, untimed: bool) -> str:
    """Fill in what the spec says the API sets; ``ev`` has passed ``check``, which read
    ``message_id`` and ``untimed``. Returns its `messageId` (the one sent, or the one
    generated)."""
    # No loop where there is nothing to do: each loop's iterator was a malloc of every
    # message (callgrind).
    if given.merged:
        for name, base in given.merged:
            own = ev.get(name)
            ev[name] = merge(base, own) if isinstance(own, dict) else dict(base)
    # The transport fields; tested first: a pop per message cost more than the test
    # (most messages carry neither).
    if "writeKey" in ev:
        del ev["writeKey"]
    if "sentAt" in ev:
        del ev["sentAt"]
    if message_id is None:
        message_id = ev["messageId"] = str(uuid.uuid4())
        given.made.add(message_id)
    if untimed:
        # Seed 003: timestamps are injected from the top level; else the receive time,
        # so that an event forwarded days later keeps the time it happened.
        ev["timestamp"] = given.received if given.timestamp is None else given.timestamp
    ev["receivedAt"] = given.received
    return message_id


def dump(ev: Any) -> bytes:
    """``ev`` as stored; Invalid if it cannot be, or nests too deep to be written once
    mapped to Nucleus (depth.py)."""
    try:
        body = orjson.dumps(ev, option=NEWLINE)[:-1]   # compact_json, inlined
    except orjson.JSONEncodeError as exc:
        raise Invalid(too_deep(ev) or f"message cannot be stored: {exc}") from exc
    if len(body) > SHALLOW_BYTES and may_be_too_deep(body) and (deep := too_deep(ev)) is not None:
        raise Invalid(deep)
    return body


def received_now() -> str:
    # Every request asks: strftime each time was ~3 µs of a single-event request.
    return iso_ms_fast(now_ms())


def accept(ev: Any, key: str, types: frozenset[str], received: str, *, enrich: Enrich,
           batch: dict[str, Any] | None = None, raw_size: int = 0,
           need_message_id: bool = False) -> Event:
    """One message checked, completed, enriched and ready to store; raises Invalid."""
    # ``accepted`` called here, not through ``accept_in``: a single call's path, a Python
    # call less.
    dedupe, body, lane = accepted(ev, key, types, shared(received, batch), enrich, raw_size,
                                  need_message_id)
    return Event(key, SEGMENT, dedupe, body, NOT_READ, lane)


def accept_in(ev: Any, key: str, types: frozenset[str], given: Shared, enrich: Enrich,
              raw_size: int = 0, need_message_id: bool = False) -> Event:
    """``accept`` for each message of a request, with what the request gives them read
    once (``shared``)."""
    dedupe, body, lane = accepted(ev, key, types, given, enrich, raw_size, need_message_id)
    return Event(key, SEGMENT, dedupe, body, NOT_READ, lane)


def dedupe_head(key: str) -> hashlib.blake2b:
    """What the dedupe keys of ``key``'s messages share, hashed once (``accepted``'s
    ``head``)."""
    return key_head("segment", key)


def accepted(ev: Any, key: str, types: frozenset[str], given: Shared, enrich: Enrich,
             raw_size: int = 0, need_message_id: bool = False,
             head: hashlib.blake2b | None = None) -> tuple[int, bytes, int]:
    """``accept_in``'s event as its fields: its dedupe key, body and lane (a batch's
    columns take them). Every message of a batch takes this path: what it calls is kept
    few. ``head``: ``dedupe_head(key)``, for a request's messages."""
    try:
        kind, name, message_id, untimed = check(ev, types, need_message_id)
    except Invalid:
        # Too large as sent is the verdict, before any rule of shape.
        if raw_size > MAX_EVENT_BYTES:
            refuse_too_large(ev)
        raise
    # Only a request larger than the limit can hold a message larger than it. Its
    # message is kept as sent (completion replaces its fields, never changes an object
    # in place), to be measured only where the stored body cannot vouch for it: a dump
    # of each message was ~10% of a large batch's instructions (callgrind).
    sent = dict(ev) if raw_size > MAX_EVENT_BYTES else None
    message_id = complete(ev, given, message_id, untimed)
    enriched = name in SEGMENT_NEEDS_FACTS
    if enriched:
        enrich.segment(ev)
    try:
        body = dump(ev)
    except Invalid:
        if sent is not None:
            refuse_too_large(sent)   # its verdict first, as sent
        raise
    # Completion only adds to what was sent (merges, fields set where absent or null)
    # but for the members it drops or replaces, and a fact it fills (one may be "" where
    # null was sent): a body at or under the limit proves the message as sent was, and
    # it cannot be stored only if the body cannot. Tested here, not in a call: most
    # messages of a large batch pass.
    if sent is not None and (len(body) > MAX_EVENT_BYTES or enriched or "writeKey" in sent
                             or "sentAt" in sent or "receivedAt" in sent):
        refuse_unless_room(body, sent, enriched)
    lanes = enrich.lanes
    return (dedupe_key("segment", key, message_id) if head is None
            else dedupe_key_after(head, message_id), body,
            # Lanes.segment without its call while no upstream names a rule.
            lanes.segment(key, kind, name) if lanes.ruled
            else HIGH if name in SEGMENT_HIGH else NORMAL)


def where(i: int, ev: Any, made: AbstractSet[str] = frozenset()) -> str:
    """Message ``i`` of a batch, by its place and the `messageId` it was sent with, if any
    (not one completion ``made`` for it, which the client never saw; not an empty one)."""
    mid = ev.get("messageId") if isinstance(ev, dict) else None
    # Exactly a str: a value the reader marked (a lone surrogate) is named by the error.
    return f"batch[{i}]" + (f" messageId={mid}" if type(mid) is str and mid
                            and mid not in made else "")


class Accepted(NamedTuple):
    """A batch's messages, each judged alone: the events to store, and the error of each
    message refused, by its place in the batch, naming it (``batch[3] messageId=m3: ...``)."""

    events: list[Event]
    refused: dict[int, Invalid]


def accept_each(body: Any, key: str, types: frozenset[str], raw_size: int, *, enrich: Enrich,
                need_message_id: bool = False, faults: Mapping[int, str] = EMPTY,
                also: Callable[[Any], None] | None = None,
                oversize: Callable[[Event], str | None] | None = None) -> Accepted:
    """Every message of a batch, each refused alone: those in ``faults`` (by index: what
    the reader could not keep as sent), those ``also`` (a dialect's own rules) or the
    family rules raise Invalid for, and those ``oversize`` names (too large for their
    upstream). An SDK drops a batch refused whole, and the good messages with it. Raises
    Invalid for the batch as a whole (``batch_items``), and when every message is refused:
    the first one's error, too large only if every one is (their common status, else 400,
    as on ``/v1/batch``)."""
    items = batch_items(body)
    given = shared(received_now(), body)
    events: list[Event] = []
    refused: dict[int, Invalid] = {}
    for i, ev in enumerate(items):
        if faults and i in faults:
            refused[i] = Invalid(faults[i])   # names its place already
            continue
        try:
            if also is not None:
                also(ev)
            event = accept_in(ev, key, types, given, enrich, raw_size, need_message_id)
            if oversize is not None and (too := oversize(event)) is not None:
                raise Invalid(too, too_large=True)
        except Invalid as exc:
            refused[i] = exc.within(where(i, ev, given.made))
        else:
            events.append(event)
    if refused and not events:
        first = next(iter(refused.values()))
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise Invalid(first.message + more, first.details,
                      too_large=all(exc.too_large for exc in refused.values()))
    return Accepted(events, refused)


def batch_items(body: Any) -> list[Any]:
    """The `batch` array of a batch request; raises Invalid for the request as a whole."""
    if not isinstance(body, dict):
        raise Invalid("expected a JSON object with a `batch` array")
    items = body.get("batch")
    if not isinstance(items, list):
        raise Invalid("`batch` must be an array of messages")
    check_dates(body)
    for name in ("context", "integrations"):   # merged into each message (shared)
        value = body.get(name)
        if value is not None and not isinstance(value, dict):
            raise Invalid(f"`{name}` must be an object")
    if len(items) > MAX_BATCH_EVENTS:
        raise Invalid(f"at most {MAX_BATCH_EVENTS} messages per batch, got {len(items)}",
                      too_large=True)
    return items


def refuse_too_large(sent: Any) -> None:
    """Raise Invalid (too large) when message ``sent``, as sent, is over MAX_EVENT_BYTES;
    dump's Invalid when it cannot be stored."""
    if len(dump(sent)) > MAX_EVENT_BYTES:
        raise Invalid(f"message over {MAX_EVENT_BYTES} bytes", too_large=True)


def refuse_unless_room(body: bytes, sent: dict[str, Any], enriched: bool) -> None:
    """``refuse_too_large(sent)``, unless ``body`` (``sent`` completed, not ``enriched``
    with device facts) has room under the limit for the members of ``sent`` completion
    drops or replaces: then ``sent`` was no larger."""
    if enriched or len(body) + replaced_bytes(sent) > MAX_EVENT_BYTES:
        refuse_too_large(sent)


def replaced_bytes(sent: dict[str, Any]) -> int:
    """The most bytes the members of message ``sent`` that completion drops or replaces
    take in its JSON (a comma each), or more than MAX_EVENT_BYTES where one is neither
    null nor a string that can be stored: the whole message is measured then. (The
    browser sends `writeKey` in each message of its batches.)"""
    size = 0
    for name in ("writeKey", "sentAt", "receivedAt"):
        if name in sent:
            value = sent[name]
            if value is not None and type(value) is not str:
                return MAX_EVENT_BYTES + 1
            try:
                size += len(name) + 4 + len(orjson.dumps(value))   # "name": and a comma
            except orjson.JSONEncodeError:   # a lone surrogate
                return MAX_EVENT_BYTES + 1
    return size
