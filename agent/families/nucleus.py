"""The Nucleus family's rules: event types, what makes a resend the same event, and what
makes a `{"data": [...]}` message valid.

Real modules resend their whole unacknowledged queue every few seconds and send
small integer ids that collide across sessions: identity is built for that.
"""

from __future__ import annotations

from typing import Any

import orjson

from agent.families.enrich import NEEDS_FACTS, Enrich
from agent.families.errors import Invalid
from agent.families.event import NUCLEUS, Event, compact_json, dedupe_key, iso_ms, now_ms

KNOWN_TYPES = frozenset({"init", "event", "error", "userid", "props", "heartbeat", "nucleus:view"})
_ID_TYPES = (int, float, str)
_ID_OR_NONE = frozenset({int, float, str, type(None)})   # exact types: bool is not an id


def event_type(ev: dict[str, Any]) -> str:
    """`type`, or the old modules' `event` key when it names a type."""
    kind = ev.get("type")
    if isinstance(kind, str) and kind:
        return kind
    old = ev.get("event")
    if isinstance(old, str) and old in KNOWN_TYPES:
        return old
    return "event"


def identity_key(key: str, ev: dict[str, Any], kind: str, ev_id: Any) -> int:
    """The dedupe key of what makes a resend the same event (as real modules resend).
    Spools keep these keys across upgrades: tests/test_dedupe.py pins them."""
    if ev_id is None:
        # No id to go on: the whole event, as sent, is its identity.
        return dedupe_key("nucleus", key, orjson.dumps(ev, option=orjson.OPT_SORT_KEYS).decode())
    get = ev.get
    return dedupe_key("nucleus", key, get("machineId") or get("deviceId") or get("anonId"),
                      get("sessionId"), ev_id, get("date"), kind, get("name"))


def check(msg: Any) -> list[dict[str, Any]]:
    """The events of message ``msg``, or Invalid naming the first problem (all or nothing)."""
    if not isinstance(msg, dict):
        raise Invalid("expected a JSON object with a `data` array")
    data = msg.get("data")
    if not isinstance(data, list):
        raise Invalid("`data` must be an array of events")
    for i, ev in enumerate(data):
        if type(ev) is dict:   # the usual event passes at once; _check names a problem
            get = ev.get
            kind, name = get("type"), get("name")
            if (type(get("id")) in _ID_OR_NONE and (kind is None or type(kind) is str)
                    and (name is None or type(name) is str)):
                continue
        _check(i, ev)
    return data


def _check(i: int, ev: Any) -> None:
    """Raise Invalid naming the first problem with event ``data[i]``."""
    if not isinstance(ev, dict):
        raise Invalid(f"data[{i}] must be an object, got {_json_type(ev)}")
    if "id" in ev and ev["id"] is not None and (
            isinstance(ev["id"], bool) or not isinstance(ev["id"], _ID_TYPES)):
        raise Invalid(f"data[{i}].id must be a string or a number")
    for field in ("type", "name"):
        value = ev.get(field)
        if value is not None and not isinstance(value, str):
            raise Invalid(f"data[{i}].{field} must be a string")


def accept(msg: Any, key: str, enrich: Enrich) -> tuple[list[Event], list[Any]]:
    """One `{"data": [...]}` message of app ``key``: (events to store, ids to ack).

    Every id is acked, heartbeats included (they keep a connection alive and are not
    analytics, so they are not stored); each event is enriched, and gets the receive
    time as its `date` when it has none. Raises Invalid.
    """
    data = check(msg)
    events: list[Event] = []
    acks: list[Any] = []
    received = None
    fill = enrich.nucleus
    lanes = enrich.lanes
    for i, ev in enumerate(data):
        get = ev.get
        ev_id = get("id")
        if ev_id is not None:
            acks.append(ev_id)
        kind = get("type")
        if not (type(kind) is str and kind):   # checked: a string or None
            kind = event_type(ev)
        if kind == "heartbeat":
            continue
        try:
            ident = identity_key(key, ev, kind, ev_id)
            if kind in NEEDS_FACTS:
                fill(ev, kind)
            if get("date") is None:
                received = received or iso_ms(now_ms())
                ev["date"] = received
            events.append(Event(key, NUCLEUS, ident, compact_json(ev), ev_id,
                                lanes.nucleus(key, kind, ev)))
        except orjson.JSONEncodeError as exc:  # nested deeper than orjson writes (255)
            raise Invalid(f"data[{i}] cannot be stored", str(exc)) from exc
    return events, acks


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
