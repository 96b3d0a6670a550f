"""The Nucleus family's rules: event types, what makes a resend the same event, and what
makes a `{"data": [...]}` message valid.

Real modules resend their whole unacknowledged queue every few seconds and send
small integer ids that collide across sessions: identity is built for that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from agent.families.depth import SHALLOW_BYTES, may_be_too_deep, too_deep
from agent.families.errors import Invalid
from agent.families.event import NEWLINE, NUCLEUS, Columns, Event, dedupe_key, iso_ms, now_ms
from agent.families.lanes import HIGH, NORMAL, NUCLEUS_HIGH
from agent.families.lifecycle import NEEDS_FACTS

if TYPE_CHECKING:   # the enrichment asks the mapping, which reads these rules
    from agent.families.enrich import Enrich

KNOWN_TYPES = frozenset({"init", "event", "error", "userid", "props", "heartbeat", "nucleus:view"})
ID_TYPES = (int, float, str)   # the ids taken, as exact types (a bool is not one)
_ID_OR_NONE = frozenset({int, float, str, type(None)})   # exact types: bool is not an id
# The longest string id taken. Every answer that acknowledges an event echoes its id, and
# an upstream's answer is read only as far as an answer to its batch can go (64 KiB past
# the batch's bytes: uplinks/http_common.py reply_cap): an id far longer, on an event sent
# alone, was never read back, and its key stuck. Modules' ids are numbers or short strings.
MAX_ID_CHARS = 1024
EMPTY: Mapping[int, str] = MappingProxyType({})


# Old modules (electron-nucleus 1-2, nucleus-python 0.3) sent one key, `event`: the app's
# event name (the Tracking API's example: "Name of the event"), or a type in one of these
# spellings; `error:<kind>` is an error named <kind>.
_OLD_TYPES = {"nucleus:userid": "userid", "nucleus:props": "props",
              "nucleus:heartbeat": "heartbeat"}
_OLD_ERROR = "error:"


def event_type(ev: dict[str, Any]) -> str:
    """`type`, or the type an old module's `event` key names (`event` when it names the
    app's event: ``event_name``)."""
    kind = ev.get("type")
    if isinstance(kind, str) and kind:
        return kind
    old = ev.get("event")
    if isinstance(old, str):
        if old in KNOWN_TYPES:
            return old
        if old.startswith(_OLD_ERROR):
            return "error"
        return _OLD_TYPES.get(old, "event")
    return "event"


def old_name(ev: dict[str, Any]) -> str | None:
    """The name an old module's `event` key gives an event with no `type` or `name` key:
    the app's event name, or an error's kind; None when it names a type alone, and for
    every event of a current module."""
    old, kind = ev.get("event"), ev.get("type")
    if not isinstance(old, str) or "name" in ev or (isinstance(kind, str) and kind):
        return None
    if old.startswith(_OLD_ERROR):
        return old[len(_OLD_ERROR):]
    return None if old in KNOWN_TYPES or old in _OLD_TYPES else old


def keyed_type(ev: dict[str, Any]) -> str:
    """The type an event without `type` has in its dedupe key: its `event` key when that
    names a type as is, else `event`, as the previous release read it (before the other
    spellings ``event_type`` reads), so that a resend across the upgrade keeps its key."""
    old = ev.get("event")
    return old if isinstance(old, str) and old in KNOWN_TYPES else "event"


def identity_key(key: str, ev: dict[str, Any], kind: str, ev_id: Any, name: Any,
                 date: Any) -> int:
    """The dedupe key of what makes a resend the same event (as real modules resend);
    ``kind``: its `type`, or ``keyed_type``; ``name`` and ``date``: its `name` and `date`
    as sent (the caller read them). Spools keep these keys across upgrades:
    tests/test_dedupe.py pins them."""
    if ev_id is None:
        # No id to go on: the whole event, as sent, is its identity.
        return dedupe_key("nucleus", key, orjson.dumps(ev, option=orjson.OPT_SORT_KEYS).decode())
    return dedupe_key("nucleus", key,
                      ev.get("machineId") or ev.get("deviceId") or ev.get("anonId"),
                      ev.get("sessionId"), ev_id, date, kind, name)


def check(msg: Any) -> list[Any]:
    """The events of message ``msg``, or Invalid naming why the message as a whole is not
    one; each event is judged alone (``fault``)."""
    if not isinstance(msg, dict):
        raise Invalid("expected a JSON object with a `data` array")
    data = msg.get("data")
    if not isinstance(data, list):
        raise Invalid("`data` must be an array of events")
    return data


def fault(i: int, ev: Any) -> str | None:
    """What is wrong with event ``data[i]`` by the family's rules, or None. ``accept`` asks
    only about an event that is not the usual one (an object whose `id`, `type` and
    `name` are of the usual types)."""
    if not isinstance(ev, dict):
        return f"data[{i}] must be an object, got {_json_type(ev)}"
    if "id" in ev and ev["id"] is not None and (
            isinstance(ev["id"], bool) or not isinstance(ev["id"], ID_TYPES)):
        return f"data[{i}].id must be a string or a number"
    if isinstance(ev.get("id"), str) and len(ev["id"]) > MAX_ID_CHARS:
        return f"data[{i}].id is longer than {MAX_ID_CHARS} characters"
    for field in ("type", "name"):
        value = ev.get(field)
        if value is not None and not isinstance(value, str):
            return f"data[{i}].{field} must be a string"
    return None


class Accepted(NamedTuple):
    """What one message gives: the events to store; the ids to ack; for each event, the
    index of its id in ``acks`` (-1: it has none), so that one left out later is left
    out by its place, never by an id another event may share; and (id, why) of each
    event left out, unacknowledged, for a problem of its own."""

    events: Sequence[Event]
    acks: list[Any]
    ack_at: list[int]
    left_out: list[tuple[Any, str]]


def accept(msg: Any, key: str, enrich: Enrich, faults: Mapping[int, str] = EMPTY,
           *, keep_parsed: bool = False) -> Accepted:
    """One `{"data": [...]}` message of app ``key``.

    Every id is acked, heartbeats included (they keep a connection alive and are not
    analytics, so they are not stored); each event is enriched, and gets the receive
    time as its `date` when it has none. An event with a problem of its own (``fault``,
    nesting too deep, what the reader found: ``faults`` by index) is left out, never
    acked: a module resends its whole unacknowledged queue in every message, so refusing
    the message would refuse every later event of the app too. One without an id cannot
    be left out of the acks: its message is refused (Invalid), as is a message that is
    not one. ``keep_parsed``: the events are Events, each with its parsed event
    (Event.parsed), not Columns.
    """
    data = check(msg)
    kept: list[Event] = []
    columns = Columns(NUCLEUS, key)
    out = Accepted(kept if keep_parsed else columns, [], [], [])
    acks = out.acks
    # A column each: appended to directly (a method of Columns would be a call an event).
    dedupes, bodies, ids, lanes = columns.dedupes, columns.bodies, columns.ids, columns.lanes
    assert ids is not None   # a Nucleus event's id is read here
    received = None
    fill = enrich.nucleus
    rules = enrich.lanes
    for i, ev in enumerate(data):
        why = faults.get(i) if faults else None
        if why is None and isinstance(ev, dict):
            # Each field read once, here: the usual event is judged by its types alone.
            ev_id, kind, name = ev.get("id"), ev.get("type"), ev.get("name")
            if not (type(ev_id) in _ID_OR_NONE and (kind is None or type(kind) is str)
                    and (name is None or type(name) is str)
                    and (type(ev_id) is not str or len(ev_id) <= MAX_ID_CHARS)):
                why = fault(i, ev)
        elif why is None:
            why = fault(i, ev)
        if why is None:
            if type(kind) is str and kind:
                keyed, named = kind, name
            else:   # checked: None or ""
                kind, keyed = event_type(ev), keyed_type(ev)
                # The name it is forwarded under: its lane's too.
                named = old_name(ev) if name is None else name
            if kind == "heartbeat":
                if ev_id is not None:
                    acks.append(ev_id)
                continue
            try:
                date = ev.get("date")
                ident = identity_key(key, ev, keyed, ev_id, name, date)
                if kind in NEEDS_FACTS:
                    fill(ev, kind)   # never the date
                if date is None:
                    received = received or iso_ms(now_ms())
                    ev["date"] = received
                body = orjson.dumps(ev, option=NEWLINE)[:-1]   # compact_json, inlined
            except orjson.JSONEncodeError as exc:  # read on the fast path: not looked at
                deep = too_deep(ev)
                why = f"data[{i}].{deep}" if deep else f"data[{i}] cannot be stored: {exc}"
            else:
                if (len(body) <= SHALLOW_BYTES or not may_be_too_deep(body)
                        or (deep := too_deep(ev)) is None):
                    out.ack_at.append(-1 if ev_id is None else len(acks))
                    if ev_id is not None:
                        acks.append(ev_id)
                    # Lanes.nucleus without its call while no upstream names a rule.
                    lane = (rules.nucleus(key, kind, named) if rules.ruled
                            else HIGH if kind in NUCLEUS_HIGH else NORMAL)
                    if keep_parsed:
                        kept.append(Event(key, NUCLEUS, ident, body, ev_id, lane, ev))
                    else:
                        dedupes.append(ident)
                        bodies.append(body)
                        ids.append(ev_id)
                        lanes.append(lane)
                    continue
                why = f"data[{i}].{deep}"
        ev_id = ev.get("id") if isinstance(ev, dict) else None
        if ev_id is None:   # nothing to leave unacknowledged
            raise Invalid(why)
        out.left_out.append((ev_id, why))
    return out


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
