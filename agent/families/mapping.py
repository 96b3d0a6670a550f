"""Mapping events between the Nucleus and Segment families, losing nothing (docs/mapping.md).

Used only when an event's family differs from its upstream's protocol (at ingest for
a Nucleus event routed to a Segment upstream, else at send time); within one family
events are forwarded exactly as stored. Both directions are pure functions of
the stored event and its receive time, so a batch sent again carries the same ids.

Every field has a place in the other family. Nucleus -> Segment: the fields with a
Segment place of their own go there, and every other one travels verbatim in
`context.nucleus`. Segment -> Nucleus: the fields with a Nucleus place go there, the
properties (or traits) become the payload, and the rest of the event travels verbatim
in `payload.$segment`. Mapping back reads those and gives the original event again
(but for `receivedAt`, the receive time of the row being mapped): an event is given
back only when mapping the result again gives exactly the event in hand, messageId
included, so an app's own `context.nucleus` or `$segment` is never mistaken for one.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

import orjson

from agent import __version__
from agent.families.dates import in_local_time, iso_ms_fast, read_date, to_iso
from agent.families.lifecycle import ERROR, OPENED
from agent.families.nucleus import event_type, old_name
from agent.families.segment import is_id

__all__ = ["ERROR", "OPENED", "SEGMENT_KEY", "nucleus_to_segment", "segment_to_nucleus",
           "to_iso", "iso_ms_fast"]

LIBRARY = {"name": "outpost", "version": __version__}
SEGMENT_KEY = "$segment"   # the Nucleus payload key holding the rest of a Segment event
_NAMED_APART = frozenset({"init", "error", "userid", "props", "nucleus:view"})
_RECEIVED = ("receivedAt",)   # set from the receive time by each mapping
_FROM_RECEIVED = ("receivedAt", "timestamp")   # ... and timestamp, for an unreadable date
# Copied for each event: building a hasher parses its keyword arguments (~2k instructions).
_MESSAGE_ID = blake2b(digest_size=12)
# The last receive time mapped, and its ISO form: a request's events share one (~2k
# instructions an event). One tuple, so that a reader never sees half of an update.
_received_at = (0, iso_ms_fast(0))
# The event fields _context gives a place in Segment's context (machineId aside).
_FACTS = frozenset({"platform", "osVersion", "version", "locale", "language", "arch",
                    "totalRam"})
_SORTED = orjson.OPT_SORT_KEYS


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _has(value: Any) -> bool:
    """A value that goes to its place in the other family (None and {} are kept apart)."""
    return value is not None and value != {}


# -- Nucleus -> Segment -------------------------------------------------------
# On the drain's hot path (every Nucleus row sent to a Segment upstream).

def nucleus_to_segment(ev: dict[str, Any], received: int) -> dict[str, Any]:
    """A Nucleus event as a Segment-spec event, with a messageId stable across sends."""
    back = segment_given_back(ev, received)
    return back if back is not None else _to_segment(ev, received)


def segment_given_back(ev: dict[str, Any], received: int) -> dict[str, Any] | None:
    """The Segment event that ``segment_to_nucleus`` mapped to ``ev``, exactly; None
    when ``ev`` is not such a mapping."""
    payload = ev.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get(SEGMENT_KEY), dict):
        return _segment_back(ev, payload, received)
    return None


def _to_segment(ev: dict[str, Any], received: int) -> dict[str, Any]:
    # One pass, on the drain's hot path: `kept` starts as a shallow copy of the event and
    # each field given a Segment place of its own is taken out of it; what is left goes
    # to context.nucleus in the event's own order. Key order is part of the output.
    get = ev.get
    kind = get("type")
    if not (isinstance(kind, str) and kind):
        kind = event_type(ev)   # an old module's `event` key, or "event"
    kept = dict(ev)
    raw_date = get("date")
    date = read_date(raw_date, received)
    if date is not None and date == raw_date:
        del kept["date"]   # already in the form of `timestamp`: given back from there
    global _received_at
    last = _received_at
    if last[0] == received:
        at = last[1]
    else:
        at = iso_ms_fast(received)
        _received_at = (received, at)
    digest = _MESSAGE_ID.copy()
    digest.update(orjson.dumps(ev, option=_SORTED))
    out: dict[str, Any] = {
        "messageId": "nucleus-" + digest.hexdigest(),
        "timestamp": date or at,
        "receivedAt": at,
    }
    # Only an id Segment takes (segment.is_id) goes to an id place (userId, anonymousId,
    # context.device.id); any other value stays in context.nucleus alone, so that no
    # acknowledged event maps to a message its upstream refuses.
    # (A string is tested inline: it is an id when not empty.)
    machine = get("machineId")
    if not (machine != "" if type(machine) is str else is_id(machine)):   # 0 is an id
        machine = get("deviceId")
        if not is_id(machine):
            machine = None
    elif "deviceId" not in ev:
        del kept["machineId"]
    user = get("userId")
    user_ok = user != "" if type(user) is str else is_id(user)
    if machine is not None:
        anon = machine
    else:
        anon = get("anonId")
        if not is_id(anon):
            anon = None if user_ok else "nucleus-anonymous"  # Segment needs one of the two
    if anon is not None:
        out["anonymousId"] = anon
    if user_ok:
        out["userId"] = user
        del kept["userId"]
    ctx = out["context"] = _context(ev, machine, kept)
    ctx["nucleus"] = kept   # still shrinking below: name and payload
    name = get("name")
    if name is None and "event" in ev:
        name = old_name(ev)   # an old module's `event` key, itself kept in context.nucleus
    raw = get("payload")
    body = raw if isinstance(raw, dict) else None if raw is None else {"payload": raw}
    if isinstance(raw, dict) and kind != "error" and kind != "userid":
        del kept["payload"]
    if kind == "props":
        out["type"] = "identify"
        if body is not None:
            out["traits"] = body
    elif kind == "userid":
        out["type"] = "identify"
    elif kind == "nucleus:view":
        out["type"] = "screen"
        if isinstance(name, str):
            out["name"] = name
            del kept["name"]
        if body is not None:
            out["properties"] = body
    else:
        out["type"] = "track"
        if kind == "init":
            out["event"] = OPENED
        elif kind == "error":
            out["event"] = ERROR
            # The error's type in properties.name (§8), else the payload's own `name`; the
            # error's payload and name both travel in context.nucleus too.
            body = {"name": name, **(body or {})}
            if name is not None:
                body["name"] = name
        elif isinstance(name, str) and name and name != kind:
            out["event"] = name
            # Absent when an old module's `event` key gave it. Beside a key of that name
            # (no `type`), kept: mapped back, the key alone would give the name, and the
            # event would come back without its `name`.
            if get("event") != name or get("type"):
                kept.pop("name", None)
        else:
            out["event"] = kind
        if body is not None:
            out["properties"] = body
    return out


def _context(ev: dict[str, Any], machine: Any, kept: dict[str, Any]) -> dict[str, Any]:
    """Device facts in Segment's context objects, each taken out of ``kept`` (the
    `nucleus` key is added after). Objects in the order os, app, locale, device."""
    ctx: dict[str, Any] = {"library": dict(LIBRARY)}
    if _FACTS.isdisjoint(ev):   # all but init and error events: ~4k instructions fewer
        if machine is not None:
            ctx["device"] = {"id": machine}
        return ctx
    get = ev.get
    os_: dict[str, Any] | None = None
    value = get("platform")
    if value is not None and value != {}:
        os_ = {"name": value}
        del kept["platform"]
    value = get("osVersion")
    if value is not None and value != {}:
        if os_ is None:
            os_ = {}
        os_["version"] = value
        del kept["osVersion"]
    if os_ is not None:
        ctx["os"] = os_
    value = get("version")
    if value is not None and value != {}:
        ctx["app"] = {"version": value}
        del kept["version"]
    locale = get("locale")
    if locale and "language" not in ev:
        del kept["locale"]
    locale = locale or get("language")
    if _has(locale):
        ctx["locale"] = locale
    device: dict[str, Any] | None = {"id": machine} if _has(machine) else None
    for field in ("arch", "totalRam"):
        value = get(field)
        if value is not None and value != {}:
            if device is None:
                device = {}
            device[field] = value
            del kept[field]
    if device is not None:
        ctx["device"] = device
    return ctx


def _nucleus_back(ev: dict[str, Any], ctx: dict[str, Any], kept: dict[str, Any],
                  received: int) -> dict[str, Any] | None:
    """The Nucleus event ``ev`` was mapped from, or None if it was not mapped from one."""
    msg = ev.get("messageId")
    if not (isinstance(msg, str) and msg.startswith("nucleus-")):
        return None
    out = dict(kept)
    os_, device = _obj(ctx.get("os")), _obj(ctx.get("device"))
    for field, value in (("userId", ev.get("userId")), ("platform", os_.get("name")),
                         ("osVersion", os_.get("version")),
                         ("version", _obj(ctx.get("app")).get("version")),
                         ("arch", device.get("arch")), ("totalRam", device.get("totalRam"))):
        if value is not None and field not in kept:
            out[field] = value
    if "machineId" not in kept and "deviceId" not in kept and "id" in device:
        out["machineId"] = device["id"]
    if "locale" not in kept and "language" not in kept and "locale" in ctx:
        out["locale"] = ctx["locale"]
    if "date" not in kept:
        out["date"] = ev.get("timestamp")
    kind = event_type(kept)
    if "name" not in kept:
        if kind == "nucleus:view" and "name" in ev:
            out["name"] = ev["name"]
        elif kind not in _NAMED_APART and ev.get("event") not in (kind, old_name(kept)):
            out["name"] = ev.get("event")
    body = ev.get("traits" if kind == "props" else "properties")
    if "payload" not in kept and kind not in ("error", "userid") and body is not None:
        out["payload"] = body
    # Times the mapping takes from the receive time are not compared: `receivedAt`,
    # and `timestamp` when the date cannot be read, or has no zone: the agent that mapped
    # it read it in its own zone (§4), maybe not this one's (a device's, then a server's
    # in UTC); the date itself is compared, in `context.nucleus` and in the messageId.
    skip = _RECEIVED if "date" not in kept or (
        read_date(kept["date"]) and not in_local_time(kept["date"])) else _FROM_RECEIVED
    mapped = _to_segment(out, received)
    lib = ctx.get("library")
    if isinstance(lib, dict) and lib.get("name") == LIBRARY["name"]:
        # Stored mapped by another version of the agent (ingest maps; the spool outlives
        # an upgrade): its version is not part of the event.
        mapped["context"]["library"] = lib
    theirs = {k: v for k, v in ev.items() if k not in skip}
    same = {k: v for k, v in mapped.items() if k not in skip} == theirs
    payload = out.get("payload")
    if not same and kind == "error" and isinstance(payload, dict) and "name" in payload:
        # Stored by a version whose error put the payload's own `name` in properties.name
        # (the type now wins it, §8): still this event.
        mapped["properties"]["name"] = payload["name"]
        same = {k: v for k, v in mapped.items() if k not in skip} == theirs
    if not same and kind == "event" and ev.get("event") == kind and old_name(kept):
        # Stored by a version that sent an old module's event name as `event: "event"`
        # (the name is the name now): still this event.
        mapped["event"] = kind
        same = {k: v for k, v in mapped.items() if k not in skip} == theirs
    return out if same else None


# -- Segment -> Nucleus -------------------------------------------------------

def segment_to_nucleus(ev: dict[str, Any], received: int,
                       machine: str | None = None) -> dict[str, Any]:
    """A Segment-spec event as a Nucleus event (the uplink supplies its `id`); ``machine``,
    the device's id, is its `machineId` when it names no device or install of its own."""
    back = given_back(ev, received)
    return back if back is not None else _to_nucleus(ev, received, machine)


def given_back(ev: dict[str, Any], received: int) -> dict[str, Any] | None:
    """The Nucleus event that ``nucleus_to_segment`` mapped to ``ev``, exactly; None
    when ``ev`` is not such a mapping."""
    ctx = _obj(ev.get("context"))
    kept = ctx.get("nucleus")
    return _nucleus_back(ev, ctx, kept, received) if isinstance(kept, dict) else None


def _view_name(ev: dict[str, Any], ctx: dict[str, Any], props: dict[str, Any],
               kind: str) -> str:
    """A page's or screen's Nucleus `name`: the first of its `name`, `context.page.path`
    and `properties.path` that is a non-empty string, else its type. A Nucleus name is a
    string (a Nucleus route leaves any other out of its acks); the paths are the app's
    to fill with anything, and every value stays in `payload.$segment` or the payload."""
    for value in (ev.get("name"), _obj(ctx.get("page")).get("path"), props.get("path")):
        if isinstance(value, str) and value:
            return value
    return kind


def _body_key(kind: Any) -> str | None:
    """The Segment field that becomes the Nucleus payload of an event of type ``kind``."""
    if kind == "identify":
        return "traits"
    return None if kind in ("group", "alias") else "properties"


def _to_nucleus(ev: dict[str, Any], received: int,
                machine: str | None = None) -> dict[str, Any]:
    kind = ev.get("type")
    ctx = _obj(ev.get("context"))
    kept = _obj(ctx.get("nucleus"))
    props, traits = _obj(ev.get("properties")), _obj(ev.get("traits"))
    if kind == "track":
        opened = ev.get("event") == OPENED
        out: dict[str, Any] = {"type": "init" if opened else "event",
                               "name": None if opened else ev.get("event"), "payload": props}
        if ev.get("event") == ERROR and isinstance(props.get("name"), str):
            out.update(type="error", name=props["name"],
                       payload={k: v for k, v in props.items() if k != "name"})
    elif kind == "identify":
        out = {"type": "props" if traits else "userid", "payload": traits}
    elif kind in ("page", "screen"):
        out = {"type": "nucleus:view", "name": _view_name(ev, ctx, props, kind),
               "payload": props}
    elif kind == "group":
        out = {"type": "event", "name": "group", "payload": {**traits, "groupId": ev.get("groupId")}}
    elif kind == "alias":
        out = {"type": "userid", "payload": {"previousId": ev.get("previousId")}}
    else:
        out = {"type": "event", "name": str(kind), "payload": props}
    # The body leaves the rest only when the payload gives it back exactly: an
    # object that is not empty and holds neither key the mapping adds to the payload.
    body_key = _body_key(kind)
    body = ev.get(body_key) if body_key is not None else None
    payload = out["payload"] = dict(out["payload"])
    if isinstance(body, dict) and body and "messageId" not in body and SEGMENT_KEY not in body:
        rest = {k: v for k, v in ev.items() if k != body_key}
    else:
        rest = ev
    if ev.get("messageId") is not None:
        payload.setdefault("messageId", ev["messageId"])
    payload[SEGMENT_KEY] = rest
    os_ctx, device, app = _obj(ctx.get("os")), _obj(ctx.get("device")), _obj(ctx.get("app"))
    user_id, device_id, anon = ev.get("userId"), device.get("id"), ev.get("anonymousId")
    out.update({
        "date": ev.get("timestamp") or ev.get("originalTimestamp") or ev.get("receivedAt")
        or iso_ms_fast(received),
        "userId": str(user_id) if isinstance(user_id, (int, float)) else user_id,
        # The Nucleus API requires one on every event: an event with a userId alone came
        # from this device (the agent runs on it), as its "Application Opened" says.
        "machineId": device_id if device_id or is_id(device_id)
        else anon if is_id(anon) else machine,
        "anonId": anon,
        "sessionId": kept.get("sessionId") if kept.get("sessionId") is not None
        else ctx.get("sessionId"),
        "platform": os_ctx.get("name"), "osVersion": os_ctx.get("version"),
        "locale": ctx.get("locale"), "language": ctx.get("locale"),
        "version": app.get("version"), "totalRam": device.get("totalRam"),
        "arch": device.get("arch"),
        "appId": kept.get("appId"), "client": kept.get("client"),
        "moduleVersion": kept.get("moduleVersion"),
    })
    return {k: v for k, v in out.items() if v is not None}


def _segment_back(ev: dict[str, Any], payload: dict[str, Any],
                  received: int) -> dict[str, Any] | None:
    """The Segment event ``ev`` was mapped from, or None if it was not mapped from one."""
    rest = payload[SEGMENT_KEY]
    out = dict(rest)
    body_key = _body_key(rest.get("type"))
    if body_key is not None and body_key not in rest:
        body = {k: v for k, v in payload.items() if k != SEGMENT_KEY
                and not (k == "messageId" and "messageId" in rest)}
        if ev.get("type") == "error":
            out[body_key] = {"name": ev.get("name"), **body}
        elif body:
            out[body_key] = body
    # Its `id` is not compared: the mapping gives none, and the uplink that sent it over a
    # Nucleus hop gave it its spool seq (§2), as an ack id; it is no part of the event.
    theirs = ev if "id" not in ev else {k: v for k, v in ev.items() if k != "id"}
    # A machineId the mapping gave it (``machine``) was the mapping agent's device's.
    return out if _to_nucleus(out, received, ev.get("machineId")) == theirs else None
