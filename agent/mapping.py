"""Mapping events between the Nucleus and Segment families (docs/mapping.md).

Used only when an event's family differs from its upstream's protocol;
within one family events are forwarded exactly as stored.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

from .events import iso_ms

_SEGMENT_TO_NUCLEUS_TYPE = {"track": "event", "identify": "props", "page": "nucleus:view",
                            "screen": "nucleus:view", "group": "event", "alias": "userid"}


def _iso_date(value: Any, received: int) -> str:
    """A Nucleus `date` (ISO, naive ISO, epoch ms int or float) as ISO 8601."""
    if isinstance(value, bool) or value is None:
        return iso_ms(received)
    if isinstance(value, (int, float)):
        # Seconds if it looks like seconds, else milliseconds.
        ms = value * 1000 if value < 1e11 else value
        return iso_ms(int(ms))
    if isinstance(value, str) and value:
        return value
    return iso_ms(received)


def segment_to_nucleus(ev: dict[str, Any], received: int) -> dict[str, Any]:
    """A Segment-spec event as a Nucleus event (its spool seq becomes the id)."""
    kind = str(ev.get("type") or "track")
    ctx = ev.get("context") if isinstance(ev.get("context"), dict) else {}
    assert isinstance(ctx, dict)
    device = ctx.get("device") if isinstance(ctx.get("device"), dict) else {}
    assert isinstance(device, dict)
    os_ctx = ctx.get("os") if isinstance(ctx.get("os"), dict) else {}
    assert isinstance(os_ctx, dict)
    if kind == "track":
        name = ev.get("event")
        payload = ev.get("properties")
    elif kind in ("identify", "group"):
        name = "group" if kind == "group" else None
        payload = ev.get("traits")
    elif kind in ("page", "screen"):
        name = ev.get("name")
        payload = ev.get("properties")
    else:
        name = None
        payload = None
    out: dict[str, Any] = {
        "type": _SEGMENT_TO_NUCLEUS_TYPE.get(kind, "event"),
        "date": ev.get("timestamp") or ev.get("originalTimestamp") or iso_ms(received),
        "userId": ev.get("userId"),
        "machineId": device.get("id") or ev.get("anonymousId"),
        "sessionId": ctx.get("sessionId"),
        "payload": dict(payload) if isinstance(payload, dict) else {},
    }
    if name is not None:
        out["name"] = name
    if kind == "group":
        out["payload"]["groupId"] = ev.get("groupId")
    if kind == "alias":
        out["payload"]["previousId"] = ev.get("previousId")
    if ev.get("messageId") is not None:
        out["payload"]["messageId"] = ev.get("messageId")
    for src, dst in (("name", "platform"), ("version", "osVersion")):
        if os_ctx.get(src) is not None:
            out[dst] = os_ctx[src]
    if ctx.get("locale") is not None:
        out["locale"] = ctx["locale"]
    return {k: v for k, v in out.items() if v is not None}


def nucleus_to_segment(ev: dict[str, Any], received: int) -> dict[str, Any]:
    """A Nucleus event as a Segment-spec event, with a stable messageId."""
    kind = str(ev.get("type") or ev.get("event") or "event")
    payload = ev.get("payload") if isinstance(ev.get("payload"), dict) else {}
    out: dict[str, Any] = {
        "messageId": "nucleus-" + hashlib.blake2b(
            repr(sorted(ev.items())).encode(), digest_size=12).hexdigest(),
        "timestamp": _iso_date(ev.get("date"), received),
        "receivedAt": iso_ms(received),
        "anonymousId": ev.get("machineId") or ev.get("deviceId") or ev.get("anonId"),
        "userId": ev.get("userId"),
        "context": _nucleus_context(ev),
    }
    if kind == "userid":
        out["type"] = "identify"
    elif kind == "props":
        out.update(type="identify", traits=payload)
    elif kind == "nucleus:view":
        out.update(type="screen", name=ev.get("name"), properties=payload)
    else:
        name = ev.get("name") if kind == "event" else f"{kind}: {ev['name']}" if ev.get("name") else kind
        out.update(type="track", event=name, properties=payload)
    return {k: v for k, v in out.items() if v is not None}


def _nucleus_context(ev: dict[str, Any]) -> dict[str, Any]:
    ctx: dict[str, Any] = {"library": {"name": "outpost", "version": "0.1.0"}}
    if ev.get("platform") is not None or ev.get("osVersion") is not None:
        ctx["os"] = {"name": ev.get("platform"), "version": ev.get("osVersion")}
    if ev.get("locale") or ev.get("language"):
        ctx["locale"] = ev.get("locale") or ev.get("language")
    if ev.get("version") is not None:
        ctx["app"] = {"version": ev.get("version")}
    device = {k: v for k, v in (("id", ev.get("machineId") or ev.get("deviceId")),
                                ("arch", ev.get("arch")), ("totalRam", ev.get("totalRam")))
              if v is not None}
    if device:
        ctx["device"] = device
    if ev.get("sessionId") is not None:
        ctx["sessionId"] = ev.get("sessionId")
    return ctx


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
