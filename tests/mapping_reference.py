"""The family mapping as it was before it was made faster (commit 0669303), kept verbatim
as the reference that tests/test_mapping_equivalence.py holds the fast code to, byte for
byte. Only its imports are adapted; do not change its logic."""

# ruff: noqa
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
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


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None and v != {}}


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
        or iso_ms(received),
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

def nucleus_to_segment(ev: dict[str, Any], received: int) -> dict[str, Any]:
    """A Nucleus event as a Segment-spec event, with a messageId stable across sends."""
    kind = event_type(ev)
    raw_payload = ev.get("payload")
    payload = raw_payload if isinstance(raw_payload, dict) else (
        {} if raw_payload is None else {"payload": raw_payload})
    name = ev.get("name") if isinstance(ev.get("name"), str) else None
    out: dict[str, Any] = {
        "messageId": "nucleus-" + hashlib.blake2b(
            orjson.dumps(ev, option=orjson.OPT_SORT_KEYS), digest_size=12).hexdigest(),
        "timestamp": to_iso(ev.get("date"), received),
        "receivedAt": iso_ms(received),
        "anonymousId": ev.get("machineId") or ev.get("deviceId") or ev.get("anonId"),
        "userId": ev.get("userId"),
        "context": nucleus_context(ev, kind),
    }
    if kind == "props":
        out.update(type="identify", traits=payload)
    elif kind == "userid":
        out["type"] = "identify"
    elif kind == "nucleus:view":
        out.update(type="screen", name=name, properties=payload)
    elif kind == "init":
        out.update(type="track", event=OPENED, properties=payload)
    elif kind == "error":
        out.update(type="track", event=ERROR, properties={"name": name, **payload})
    else:
        out.update(type="track", event=name or kind, properties=payload)
    if out["anonymousId"] is None and out["userId"] is None:
        out["anonymousId"] = "nucleus-anonymous"  # Segment needs one of the two
    return {k: v for k, v in out.items() if v is not None}


def nucleus_context(ev: dict[str, Any], kind: str) -> dict[str, Any]:
    """Device facts in Segment's context objects; Nucleus ids in `context.nucleus`."""
    return _compact({
        "library": dict(LIBRARY),
        "os": _compact({"name": ev.get("platform"), "version": ev.get("osVersion")}),
        "app": _compact({"version": ev.get("version")}),
        "locale": ev.get("locale") or ev.get("language"),
        "device": _compact({"id": ev.get("machineId") or ev.get("deviceId"),
                            "arch": ev.get("arch"), "totalRam": ev.get("totalRam")}),
        "nucleus": _compact({"type": kind, **{k: ev.get(k) for k in _NUCLEUS_KEPT}}),
    })


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
            return iso_ms(int(ms))
        if isinstance(value, str) and value:
            when = datetime.fromisoformat(value.strip())
            if when.tzinfo is None:
                when = when.astimezone()  # naive: the device's local time (the agent's too)
            return iso_ms(int(when.astimezone(timezone.utc).timestamp() * 1000))
    except (ValueError, OverflowError, OSError):
        pass
    return iso_ms(received)
