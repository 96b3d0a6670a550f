"""Reading a Nucleus `{"data": [...]}` message so that one bad event refuses itself alone.

A module resends its whole unacknowledged queue in every message, so a message refused
for one event (a lone surrogate, as nucleus-nodejs writes for a sliced emoji; NaN, as
Python's json.dumps writes; an integer a double would round) was refused again with every
later event of the app. orjson reads the usual message; only one it refuses, or one that
may hold a wide integer (a bytes-level check), is read again by the standard library,
which reads all three, with each such value left as a marker: the events holding one are
named, by position, with the reason, and the family leaves them out of the acks. A body
that is not JSON even so is still refused whole.
"""

from __future__ import annotations

from typing import Any

import orjson

from agent.dialects.body import BodyError
from agent.dialects.exact_json import (
    NonFinite,
    Wide,
    may_be_wide,
    nonfinite_error,
    read_marked,
    wide_error,
)
from agent.families.depth import first_hit

_UNKEPT = (Wide, NonFinite)


def read(raw: bytes | str) -> tuple[Any, dict[int, str]]:
    """The message, and why each event of it that cannot be kept cannot, by its index in
    `data`. Raises BodyError(400) for a body that is not JSON."""
    if not raw:
        raise BodyError(400, "empty body: expected JSON")
    data = raw.encode() if isinstance(raw, str) else raw
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return _reread(data, str(exc))
    if may_be_wide(data):
        return _reread(data, "")
    return msg, {}


def _reread(data: bytes, why: str) -> tuple[Any, dict[int, str]]:
    try:
        msg = read_marked(data)
    except RecursionError:
        raise BodyError(400, "invalid JSON", "nested too deeply") from None
    except ValueError:   # not JSON at all (UnicodeDecodeError is one too): orjson's words
        raise BodyError(400, "invalid JSON", why) from None
    if not isinstance(msg, dict) or not isinstance(events := msg.get("data"), list):
        return msg, {}   # the family refuses it whole, naming why
    faults: dict[int, str] = {}
    for i, ev in enumerate(events):
        if (fault := _fault(f"data[{i}]", ev)) is not None:
            faults[i] = fault
    return msg, faults


def _fault(where: str, ev: Any) -> str | None:
    """What keeps event ``ev`` (at ``where``) from being stored as sent, or None."""
    found = first_hit(ev, _UNKEPT, 2**31)
    if found is not None:
        path, value = found
        field = f"{where}.{path}" if path else where
        if isinstance(value, Wide):   # the problem first, as in a close reason
            refused = wide_error(field, value)
            return f"{refused.message}: {refused.details}"
        return nonfinite_error(field, value)
    try:
        orjson.dumps(ev)
    except orjson.JSONEncodeError as exc:   # a lone surrogate, say
        return f"{where} cannot be written as JSON: {exc}"
    return None
