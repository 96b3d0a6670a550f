"""Strict JSON, read so that every value is kept as written, or refused with a 400.

orjson reads an integer outside -2**63 .. 2**64 - 1 as a float, so 18446744073709551616
would be stored and forwarded as 1.8446744073709552e+19: a value silently changed. A
body holding one is refused with a 400 naming the field, as NaN and Infinity are
(relaxed_json.py).

Every such integer has at least 19 digits in a row, so a body without a 19-digit run
(nearly all) costs one translate and one substring search, about 1 ns a byte (a regex
took 17 ns); only a body with one is parsed again, exactly, to find the field.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from agent.dialects.body import BodyError

LOWEST, HIGHEST = -(2**63), 2**64 - 1
# Digits kept as "0", every other byte blanked: a 19-digit run becomes 19 zeros.
_DIGITS_ONLY = bytes(48 if 48 <= c <= 57 else 32 for c in range(256))
_RUN = b"0" * 19


def parse_json(raw: bytes | str) -> Any:
    if not raw:
        raise BodyError(400, "empty body: expected JSON")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BodyError(400, "invalid JSON", str(exc)) from exc
    refuse_wide(raw)
    return value


def wide_error(field: str, digits: str) -> BodyError:
    # The field in both: a websocket's close reason carries the message alone, a Segment
    # error the details under a fixed message.
    field = field or "the body"
    shown = digits if len(digits) <= 60 else f"{digits[:57]}..."
    return BodyError(400, f"{field} is an integer beyond 64 bits",
                     f"{field}: {shown} would not be kept exactly; send it as a string")


def refuse_wide(raw: bytes | str) -> None:
    """BodyError(400) naming the first integer of ``raw`` (JSON that orjson has read)
    that is out of range; nothing when there is none."""
    data = raw.encode() if isinstance(raw, str) else raw
    if _RUN not in data.translate(_DIGITS_ONLY):
        return
    try:
        value = json.loads(data, parse_int=_exact)
    except RecursionError:
        # Past the interpreter's depth (orjson reads 1024 levels): no event that deep
        # could be stored anyway (orjson writes 255).
        raise BodyError(400, "invalid JSON", "nested too deeply") from None
    except ValueError as exc:   # none known: orjson is the stricter reader
        raise BodyError(400, "invalid JSON", str(exc)) from exc
    found = _first_wide(value)
    if found is not None:
        raise wide_error(*found)


class _Wide(str):
    """An integer's text, out of range: what the exact parse leaves in its place."""


def _exact(text: str) -> int | _Wide:
    # By length first: int() of thousands of digits is slow, and refused past 4300.
    if len(text.lstrip("-")) > 20:
        return _Wide(text)
    number = int(text)
    return number if LOWEST <= number <= HIGHEST else _Wide(text)


def _first_wide(value: Any) -> tuple[str, str] | None:
    """(path, digits) of the first out-of-range integer in ``value``, in document order."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, _Wide):
            return path.lstrip("."), str(item)
        if isinstance(item, dict):
            stack.extend((f"{path}.{k}", v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return None
