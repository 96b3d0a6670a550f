"""A usual Nucleus message stored as sent: each event's own bytes, with a `date` added at
its end where it has none, instead of each event parsed into a dict and encoded again.

A module sends `{"data": [...]}` of events that each carry an `id`, a `type`, a `date` and
the ids a resend is known by. For those, ``accepted`` reads with msgspec only what
``nucleus.accept`` reads of each event (its type, name, id, date and identity), keeps the
rest as the bytes it came in, and adds `date` (the receive time) where absent, as
``nucleus.accept`` would. The stored body means what the parsed-and-encoded one would (a
reader gets the same members and values); its bytes are the module's. ``accepted``
returns None for any message it cannot vouch for so, and the caller takes the general
path (``nucleus.accept`` on orjson's dicts), which judges and names every problem: an
event left out for a fault of its own, one without an id (the whole event is its
identity), one whose facts enrich fills (`init`, `error`), an old module's event with no
`type`, a `date` of null (set in place), one too deep.

The caller first makes sure orjson would read the whole message the same
(exact_json's ``kept_as_sent``): msgspec skips the members it does not read without
checking that their bytes are UTF-8 or that their numbers fit a double, as orjson does.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, Raw

from agent.families.depth import SHALLOW_BYTES, may_be_too_deep
from agent.families.enrich import NEEDS_FACTS
from agent.families.event import NUCLEUS, Columns, dedupe_key
from agent.families.lanes import HIGH, NORMAL, NUCLEUS_HIGH, Lanes
from agent.families.nucleus import MAX_ID_CHARS, Accepted


class _Message(msgspec.Struct):
    """What ``nucleus.check`` reads of a message: the rest of it is never stored."""

    data: list[Raw]


class _Event(msgspec.Struct):
    """What ``nucleus.accept`` and ``identity_key`` read of an event. None: absent or JSON
    null, which ``dict.get`` does not tell apart either; `date` UNSET: absent (a null one
    is set in place, by the general path)."""

    id: Any = None
    type: Any = None
    name: Any = None
    date: Any = UNSET
    machineId: Any = None   # noqa: N815 (the API's names)
    deviceId: Any = None   # noqa: N815
    anonId: Any = None   # noqa: N815
    sessionId: Any = None   # noqa: N815


_read_message = msgspec.json.Decoder(_Message).decode
_read_event = msgspec.json.Decoder(_Event).decode
_ID_TYPES = frozenset({int, float, str})   # exact types: a bool is not an id


def accepted(raw: bytes, key: str, received: str, lanes: Lanes, most: int) -> Accepted | None:
    """The events of message ``raw`` of app ``key``, each stored as sent, and their acks;
    None when any event or the message needs the general path (the module's docstring).
    ``received``: the message's receive time, the `date` of an event without one;
    ``most``: the most events a message may hold (the general path refuses more)."""
    try:
        items = _read_message(raw).data
    # ValidationError is a DecodeError: not a message of this shape. RecursionError: nested
    # past msgspec's depth, which the general path refuses event by event.
    except (msgspec.DecodeError, RecursionError):
        return None
    if len(items) > most:
        return None
    columns = Columns(NUCLEUS, key)
    out = Accepted(columns, [], [], [])
    acks, ack_at = out.acks, out.ack_at
    dedupes, bodies, ids, lane_of = columns.dedupes, columns.bodies, columns.ids, columns.lanes
    assert ids is not None   # a Nucleus event's id is read here
    dated = b',"date":"' + received.encode() + b'"}'
    columns.most = len(raw) + len(dated)   # a body is an event's bytes, or them dated
    ruled = lanes.ruled
    # Inline, not calls: each event pays this loop (a call is ~0.5k instructions).
    for item in items:
        try:
            ev = _read_event(item)
        except (msgspec.DecodeError, RecursionError):
            return None
        ev_id, kind, name, date = ev.id, ev.type, ev.name, ev.date
        # A heartbeat alone may have no id (modules send one every tick without).
        if not (type(kind) is str and kind and (name is None or type(name) is str)
                and (type(ev_id) in _ID_TYPES or (ev_id is None and kind == "heartbeat"))
                and (type(ev_id) is not str or len(ev_id) <= MAX_ID_CHARS)):
            return None
        if kind == "heartbeat":   # acknowledged, never stored
            if ev_id is not None:
                acks.append(ev_id)
            continue
        if kind in NEEDS_FACTS or date is None:
            return None
        if date is UNSET:   # put last, as the general path's encoding puts it
            body = b"".join((memoryview(item)[:-1], dated))
            date = None
        else:
            body = bytes(item)
        if len(body) > SHALLOW_BYTES and may_be_too_deep(body):
            return None
        try:
            dedupe = dedupe_key("nucleus", key, ev.machineId or ev.deviceId or ev.anonId,
                                ev.sessionId, ev_id, date, kind, name)
        except TypeError:   # an integer past 64 bits, which orjson reads otherwise
            return None
        dedupes.append(dedupe)
        bodies.append(body)
        ids.append(ev_id)
        lane_of.append(lanes.nucleus(key, kind, name) if ruled
                       else HIGH if kind in NUCLEUS_HIGH else NORMAL)
        ack_at.append(len(acks))
        acks.append(ev_id)
    return out
