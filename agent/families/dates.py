"""Nucleus dates as ISO 8601 UTC, for the mapping to Segment (docs/mapping.md, Timestamps)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from agent.families.event import iso_ms

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)


def read_date(value: Any, received: int | None = None) -> str | None:
    """A Nucleus `date` as ISO 8601 UTC with milliseconds, or None if it cannot be read.

    Modules send an ISO string with a zone, a naive ISO string in the device's
    local time (python), epoch milliseconds (JS) or seconds (Swift, a float),
    or nothing. A local time the end of DST repeats (02:30 twice) is the later of its
    two instants when that is not after ``received`` (the event's receive time, epoch
    ms), else the earlier: an event is received after it happens, and modules send it
    within seconds.
    """
    if isinstance(value, str):
        if len(value) == 24:
            if value[19:] in _TAILS and value[:19] in _VALID:
                return value   # the usual date: read as itself (see _utc_ms)
            fast = _utc_ms(value)
            if fast is not None:
                return fast
        # One minus sign at most: "--5" is no number, and Decimal raises for it.
        digits = value.strip().removeprefix("-").replace(".", "", 1)
        if digits.isascii() and digits.isdigit():   # isdigit alone takes '²', Decimal not
            value = Decimal(value.strip())
    try:
        if type(value) is int:   # what JS modules send: no Decimal needed (~5k instructions)
            return iso_ms_fast(value * 1000 if -10**11 < value < 10**11 else value)
        if isinstance(value, float):
            # The decimal the client wrote (the shortest repr), not the binary float:
            # 1767225600.123 * 1000 is 1767225600122.9998.
            value = Decimal(repr(value))
        if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
            number = Decimal(value)
            ms = number * 1000 if abs(number) < 10**11 else number   # seconds, else ms
            return iso_ms_fast(int(ms.to_integral_value(ROUND_FLOOR)))
        if isinstance(value, str) and value:
            when = datetime.fromisoformat(value.strip())
            if when.tzinfo is None:   # naive: the device's local time (the agent's too)
                local = when
                when = local.astimezone()   # the first reading of a repeated hour
                if received is not None:
                    later = local.replace(fold=1).astimezone()
                    if later > when and (later - _EPOCH) // _MS <= received:
                        when = later
            return iso_ms_fast((when - _EPOCH) // _MS)   # exact: no float seconds
    except (ValueError, OverflowError, OSError, ArithmeticError):
        pass
    return None


def in_local_time(value: Any) -> bool:
    """Whether ``read_date`` reads ``value`` as the device's local time (an ISO date with no
    zone): its instant then depends on the zone of the agent reading it (and, in an hour
    the end of DST repeats, on the receipt)."""
    if not isinstance(value, str):
        return False
    text = value.strip()
    digits = text.removeprefix("-").replace(".", "", 1)
    if digits.isascii() and digits.isdigit():   # epoch seconds or milliseconds
        return False
    try:
        return datetime.fromisoformat(text).tzinfo is None
    except ValueError:
        return False


def to_iso(value: Any, received: int) -> str:
    """``read_date(value, received)``, or the receive time for a date that cannot be read."""
    return read_date(value, received) or iso_ms_fast(received)


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
# send) skip fromisoformat but once a date-and-time: such a date, read, is itself (its
# fields are the zero-padded digits iso_ms writes), once its date-and-time is known valid.
_UTC_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", re.ASCII)
_TAILS = frozenset(f".{ms:03d}Z" for ms in range(1000))
_VALID: set[str] = set()   # "YYYY-mm-ddTHH:MM:SS" read as a date; bounded


def _utc_ms(value: str) -> str | None:
    """``read_date(value)`` for a 24-character value shaped as above, its date-and-time
    remembered as valid (read_date then answers the next alone), else None (the caller
    then reads it the long way): the same millisecond the long way reads."""
    if _UTC_MS.fullmatch(value) is None:
        return None
    try:
        datetime.fromisoformat(value[:19])
    except ValueError:   # a month 13, say: the long way says None too
        return None
    if len(_VALID) >= _SECONDS_MAX:
        _VALID.clear()
    _VALID.add(value[:19])
    return value
