"""Nucleus dates as ISO 8601 UTC, for the mapping to Segment (docs/mapping.md, Timestamps)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from agent.families.event import iso_ms


def read_date(value: Any) -> str | None:
    """A Nucleus `date` as ISO 8601 UTC with milliseconds, or None if it cannot be read.

    Modules send an ISO string with a zone, a naive ISO string in the device's
    local time (python), epoch milliseconds (JS) or seconds (Swift, a float),
    or nothing.
    """
    if isinstance(value, str):
        digits = value.strip().lstrip("-").replace(".", "", 1)
        if digits.isascii() and digits.isdigit():   # isdigit alone takes '²', float() not
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
    return None


def to_iso(value: Any, received: int) -> str:
    """``read_date(value)``, or the receive time for a date that cannot be read."""
    return read_date(value) or iso_ms_fast(received)


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
