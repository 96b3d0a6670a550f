"""Mapping events between the Nucleus and Segment families (docs/mapping.md).

Used only when an event's family differs from its upstream's protocol;
within one family events are forwarded exactly as stored. Both directions
are pure functions of the stored event and its receive time, so a batch
sent again after a failure carries the same ids.

What has no place in the other family is kept where it can be: Nucleus'
type, id, sessionId and appId travel in `context.nucleus` of a Segment
event, and come back from there when that event returns to Nucleus.
"""

from __future__ import annotations

from datetime import datetime, timezone
from hashlib import blake2b
from typing import Any

import orjson

from agent import __version__
from agent.families.event import iso_ms
from agent.families.nucleus import event_type

OPENED = "Application Opened"   # Segment's lifecycle event, Nucleus' `init`
ERROR = "Application Error"
LIBRARY = {"name": "outpost", "version": __version__}
_NUCLEUS_KEPT = ("id", "sessionId", "appId", "client", "moduleVersion")


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# -- Segment -> Nucleus -------------------------------------------------------

def segment_to_nucleus(ev: dict[str, Any], received: int) -> dict[str, Any]:
    """A Segment-spec event as a Nucleus event (the uplink supplies its `id`)."""
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
        page = _obj(ctx.get("page"))
        out = {"type": "nucleus:view", "name": ev.get("name") or page.get("path")
               or props.get("path") or kind, "payload": props}
    elif kind == "group":
        out = {"type": "event", "name": "group", "payload": {**traits, "groupId": ev.get("groupId")}}
    elif kind == "alias":
        out = {"type": "userid", "payload": {"previousId": ev.get("previousId")}}
    else:
        out = {"type": "event", "name": str(kind), "payload": props}
    if isinstance(kept.get("type"), str) and kind == "track" and out["type"] == "event":
        out["type"] = kept["type"]  # a Nucleus event coming back home
    out["payload"] = dict(out["payload"])
    if ev.get("messageId") is not None:
        out["payload"].setdefault("messageId", ev["messageId"])
    os_ctx, device, app = _obj(ctx.get("os")), _obj(ctx.get("device")), _obj(ctx.get("app"))
    user_id = ev.get("userId")
    out.update({
        "date": ev.get("timestamp") or ev.get("originalTimestamp") or ev.get("receivedAt")
        or iso_ms_fast(received),
        "userId": str(user_id) if isinstance(user_id, (int, float)) else user_id,
        "machineId": device.get("id") or ev.get("anonymousId"),
        "anonId": ev.get("anonymousId"),
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


# -- Nucleus -> Segment -------------------------------------------------------
# On the drain's hot path (every Nucleus row sent to a Segment upstream), so written
# for speed: keys are added in the order the mapping defines, only when not None,
# instead of building and filtering dicts; the output is byte-identical to the plain
# version (tests/test_mapping_equivalence.py holds it to that).

def nucleus_to_segment(ev: dict[str, Any], received: int) -> dict[str, Any]:
    """A Nucleus event as a Segment-spec event, with a messageId stable across sends."""
    get = ev.get
    kind = event_type(ev)
    raw_payload = get("payload")
    payload = raw_payload if isinstance(raw_payload, dict) else (
        {} if raw_payload is None else {"payload": raw_payload})
    name = get("name")
    if not isinstance(name, str):
        name = None
    machine = get("machineId") or get("deviceId")
    anon = machine or get("anonId")
    user = get("userId")
    out: dict[str, Any] = {
        "messageId": "nucleus-" + blake2b(
            orjson.dumps(ev, option=orjson.OPT_SORT_KEYS), digest_size=12).hexdigest(),
        "timestamp": to_iso(get("date"), received),
        "receivedAt": iso_ms_fast(received),
    }
    if anon is None and user is None:
        anon = "nucleus-anonymous"  # Segment needs one of the two
    if anon is not None:
        out["anonymousId"] = anon
    if user is not None:
        out["userId"] = user
    out["context"] = _context(ev, kind, machine)
    if kind == "props":
        out["type"] = "identify"
        out["traits"] = payload
    elif kind == "userid":
        out["type"] = "identify"
    elif kind == "nucleus:view":
        out["type"] = "screen"
        if name is not None:
            out["name"] = name
        out["properties"] = payload
    else:
        out["type"] = "track"
        if kind == "init":
            out["event"], out["properties"] = OPENED, payload
        elif kind == "error":
            out["event"], out["properties"] = ERROR, {"name": name, **payload}
        else:
            out["event"], out["properties"] = name or kind, payload
    return out


def nucleus_context(ev: dict[str, Any], kind: str) -> dict[str, Any]:
    """Device facts in Segment's context objects; Nucleus ids in `context.nucleus`."""
    return _context(ev, kind, ev.get("machineId") or ev.get("deviceId"))


def _context(ev: dict[str, Any], kind: str, machine: Any) -> dict[str, Any]:
    get = ev.get
    ctx: dict[str, Any] = {"library": dict(LIBRARY)}
    name, version = get("platform"), get("osVersion")
    if (name is not None and name != {}) or (version is not None and version != {}):
        ctx["os"] = _pair("name", name, "version", version)
    version = get("version")
    if version is not None and version != {}:
        ctx["app"] = {"version": version}
    locale = get("locale") or get("language")
    if locale is not None and locale != {}:
        ctx["locale"] = locale
    part = _pair("id", machine, "arch", get("arch"))
    ram = get("totalRam")
    if ram is not None and ram != {}:
        part["totalRam"] = ram
    if part:
        ctx["device"] = part
    kept: dict[str, Any] = {"type": kind}
    for key in _NUCLEUS_KEPT:
        value = get(key)
        if value is not None and value != {}:
            kept[key] = value
    ctx["nucleus"] = kept
    return ctx


def _pair(k1: str, v1: Any, k2: str, v2: Any) -> dict[str, Any]:
    """``{k1: v1, k2: v2}`` without the values that are None or ``{}``."""
    out = {}
    if v1 is not None and v1 != {}:
        out[k1] = v1
    if v2 is not None and v2 != {}:
        out[k2] = v2
    return out


def to_iso(value: Any, received: int) -> str:
    """A Nucleus `date` as ISO 8601 UTC.

    Modules send an ISO string with a zone, a naive ISO string in the device's
    local time (python), epoch milliseconds (JS) or seconds (Swift, a float),
    or nothing; anything unreadable becomes the receive time.
    """
    if isinstance(value, str) and value.strip().lstrip("-").replace(".", "", 1).isdigit():
        value = float(value)
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ms = value * 1000 if abs(value) < 1e11 else value
            return iso_ms_fast(int(ms))
        if isinstance(value, str) and value:
            when = datetime.fromisoformat(value.strip())
            if when.tzinfo is None:
                when = when.astimezone()  # naive: the device's local time (the agent's too)
            return iso_ms_fast(int(when.astimezone(timezone.utc).timestamp() * 1000))
    except (ValueError, OverflowError, OSError):
        pass
    return iso_ms_fast(received)


# Seconds formatted by iso_ms_fast: epoch second -> "YYYY-mm-ddTHH:MM:SS.". Bounded:
# emptied when full (a backlog's events come from a few seconds at a time).
_SECONDS: dict[int, str] = {}
_SECONDS_MAX = 4096
_MILLIS = tuple(f"{ms:03d}Z" for ms in range(1000))


def iso_ms_fast(ms: int) -> str:
    """``iso_ms(ms)``, formatting each second's date and time once: a mapped event
    needs two (its date and its receive time), and strftime was a third of the mapping."""
    second = ms // 1000
    prefix = _SECONDS.get(second)
    if prefix is None:
        prefix = iso_ms(ms)[:-4]  # raises for the same values iso_ms does
        if len(_SECONDS) >= _SECONDS_MAX:
            _SECONDS.clear()
        _SECONDS[second] = prefix
    return prefix + _MILLIS[ms % 1000]
