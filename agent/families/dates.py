"""Nucleus dates as ISO 8601 UTC, for the mapping to Segment (docs/mapping.md, Timestamps)."""

from __future__ import annotations

import re
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
        if len(value) == 24:
            fast = _utc_ms(value)
            if fast is not None:
                return fast
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


# Dates already in the form mapping writes (`2026-01-15T10:20:30.123Z`, what most modules
# send) skip fromisoformat: the epoch second of each date-and-time is computed once.
_UTC_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", re.ASCII)
_EPOCH_SECOND: dict[str, int] = {}   # "YYYY-mm-ddTHH:MM:SS" -> epoch second; bounded


def _utc_ms(value: str) -> str | None:
    """``read_date(value)`` for a 24-character value shaped as above, else None (the
    caller then reads it the long way). The same arithmetic as the long way, float
    rounding included: `datetime.timestamp()` is the exact microseconds over 10**6."""
    second = _EPOCH_SECOND.get(value[:19])
    if second is None:
        if _UTC_MS.fullmatch(value) is None:
            return None
        try:
            second = int(datetime.fromisoformat(value[:19]).replace(
                tzinfo=timezone.utc).timestamp())
        except ValueError:   # a month 13, say: the long way says None too
            return None
        if len(_EPOCH_SECOND) >= _SECONDS_MAX:
            _EPOCH_SECOND.clear()
        _EPOCH_SECOND[value[:19]] = second
    elif not (value[19] == "." and value[23] == "Z" and value[20:23].isascii()
              and value[20:23].isdigit()):
        return None
    micros = second * 1_000_000 + int(value[20:23]) * 1000
    return iso_ms_fast(int(micros / 1_000_000 * 1000))
