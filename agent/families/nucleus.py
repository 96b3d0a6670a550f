"""The Nucleus family's rules: event types, and what makes a resend the same event."""

from __future__ import annotations

from typing import Any

import orjson

KNOWN_TYPES = frozenset({"init", "event", "error", "userid", "props", "heartbeat", "nucleus:view"})


def event_type(ev: dict[str, Any]) -> str:
    """`type`, or the old modules' `event` key when it names a type."""
    kind = ev.get("type")
    if isinstance(kind, str) and kind:
        return kind
    old = ev.get("event")
    if isinstance(old, str) and old in KNOWN_TYPES:
        return old
    return "event"


def identity(key: str, ev: dict[str, Any], kind: str) -> tuple[Any, ...]:
    """What makes a resend the same event (as real modules resend)."""
    device = ev.get("machineId") or ev.get("deviceId") or ev.get("anonId")
    if ev.get("id") is None:
        # No id to go on: the whole event, as sent, is its identity.
        return ("nucleus", key, orjson.dumps(ev, option=orjson.OPT_SORT_KEYS).decode())
    return ("nucleus", key, device, ev.get("sessionId"), ev.get("id"), ev.get("date"),
            kind, ev.get("name"))
