"""Strict JSON, read so that no number's value is silently changed, or refused with a 400.

orjson reads an integer outside -2**63 .. 2**64 - 1 as a double. That keeps its value
when the double is the number the literal means: exactly (2**64), or as JavaScript
writes a Number, with the double's shortest digits padded with zeros
(18446744073709552000 for 2**64; browsers can write no other kind). Any other such
integer (Python's 2**64 + 1) would be rounded, and forwarded as 1.8446744073709552e+19:
a body holding one is refused with a 400 naming the field, as NaN and Infinity are
(relaxed_json.py). The upstream APIs read numbers as doubles too.

orjson also reads `-0` (what Go's encoding/json writes for a float64 -0) as the integer
0, a double's sign lost: the exact parse reads it as -0.0, which is what the upstreams
read `-0` as.

A number nearer zero than any double (`1e-400`; the least is about 4.9e-324) reads as 0
(or -0.0): a value that is gone, not rounded, refused with a 400 naming the field as one
past a double's range (`1e400`) is. Other decimals are kept as the double they mean, which
is how the upstreams read them (a subnormal such as `1e-320` included). Such a number needs
an exponent of -100 or less (a digit, `e-` and three digits), or more zeros than a 20-digit
run.

Every integer outside the 64-bit range has 20 digits in a row, or a minus and 19.
All three are looked for in one translated copy of the body, one translate and a few
substring searches (about 17 instructions a byte, callgrind): digits as "0", so that a run
of 19 is 19 zeros and an exponent of -100 or less `0e-000`; the bytes that may end a
number (whitespace , ] }) as one byte, so that a -0 (a minus, a digit, its end) is `-0 `.
That also matches -1 .. -9 (a common sentinel), which a regex on the bytes as sent then
tells from -0. A regex for the -0 and the exponent on the bytes as sent stopped at every
minus sign (dates, ids): 23 instructions a byte with the translate. Only a body with a
20-digit run, a minus before 19, a -0 or such an exponent (in a string too: "5e-123",
"item -0 ") is parsed again, exactly.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

import orjson

from agent.dialects.body import BodyError
from agent.families.depth import first_hit, shortened

LOWEST, HIGHEST = -(2**63), 2**64 - 1
# Each byte as its part in a number: a digit "0", a minus "-", an exponent's "e", a byte
# that may end a number " ", every other byte "x".
_SHAPES = bytes(48 if 48 <= c <= 57 else c if c == 45 else 101 if c in b"eE"
                else 32 if c in b" \t\n\r,]}" else 120 for c in range(256))
_RUN = b"0" * 19
_LONG_RUN, _NEGATIVE_RUN = _RUN + b"0", b"-" + _RUN   # what may be out of range
_TINY = b"0e-000"   # an exponent of -100 or less, after a digit as JSON's always are
# ... and a number's only where a byte that may end a number follows its digits: a uuid's
# "9e-4123-" (one in 25) is not one.
_TINY_NUMBER = re.compile(rb"0e-000+(?: |\Z)")
# kept_as_sent's shapes: "+" (43) as a minus, so this finds an exponent of 100 or more too,
# past a double's range or near it.
_SIGNS_ALIKE = _SHAPES[:43] + b"-" + _SHAPES[44:]
_EXPONENT_100 = re.compile(rb"0e-?000+(?: |\Z)")
# A -0 that is not -0.5, -0e1 or -01, on the bytes as sent, where 0 is not another digit.
_MINUS_ZERO = re.compile(rb"-0(?![0-9.eE])")


def parse_json(raw: bytes | str) -> Any:
    if not raw:
        raise BodyError(400, "empty body: expected JSON")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # Named when it holds what JSON cannot carry (an app's json.dumps writes NaN).
        refuse_unkept(reread(raw.encode() if isinstance(raw, str) else raw, str(exc)))
        raise BodyError(400, "invalid JSON", str(exc)) from None
    return exactly(raw, value)


class NonFinite(str):
    """NaN, Infinity or a number past a double, as written: JSON has no such value.
    What ``read_marked`` leaves in its place."""


class PastDouble(NonFinite):
    """A number past a double's range (1E400), as written: JSON, but no reader here or
    upstream can hold it (a double would be infinity)."""


class Unpaired(str):
    """A string holding a lone surrogate ("\\ud83d": JavaScript's slice cut inside an
    emoji), or a member name holding one: UTF-8 cannot write it. What ``read_marked``
    leaves in its place."""


def _float(text: str) -> float | NonFinite:
    value = float(text)
    return PastDouble(text) if math.isinf(value) or underflows(text, value) else value


def underflows(text: str, value: float) -> bool:
    """Whether the literal ``text``, read as ``value``, is a number nearer zero than any
    double: read as 0, though a digit of its mantissa is not."""
    return value == 0 and text.lower().partition("e")[0].strip("-+0.") != ""


def _unpaired(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _mark_list(items: list[Any]) -> list[Any]:
    for i, value in enumerate(items):
        if type(value) is str:
            if _unpaired(value):
                items[i] = Unpaired(value)
        elif type(value) is list:
            _mark_list(value)   # an object inside was marked as it was read
    return items


def _mark_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = {}
    for name, value in pairs:
        if _unpaired(name):
            value = Unpaired(name)
        elif type(value) is str:
            if _unpaired(value):
                value = Unpaired(value)
        elif type(value) is list:
            _mark_list(value)
        out[name] = value
    return out


def read_marked(data: bytes) -> Any:
    """``data`` read by the standard library, which also reads what orjson refuses (lone
    surrogates, NaN, Infinity) or would round (wide integers), each left as a marker
    (Unpaired, NonFinite, Wide) to be named (``unkept``). Raises ValueError (not JSON
    even so) or RecursionError. UTF-8 only, as orjson: given bytes, the standard library
    would guess UTF-16 or UTF-32, or skip a BOM; a surrogate's bytes pass, to be named."""
    value = json.loads(data.decode("utf-8", "surrogatepass"), parse_int=exact_int,
                       parse_float=_float, parse_constant=NonFinite,
                       object_pairs_hook=_mark_pairs)
    return _mark_list(value) if type(value) is list else value


def nonfinite_error(field: str, text: str) -> str:
    return f"{field or 'the body'}: {text} is not a JSON value (JSON has no NaN or Infinity)"


def past_double_error(field: str, text: str) -> BodyError:
    # As wide_error: the problem and the field in the message, for a close reason.
    field = shortened(field or "the body", 100)
    where = ("nearer zero than any double (about 4.9e-324): the agent and the upstreams, "
             "which read numbers as doubles, would read it as 0" if float(text) == 0 else
             "past a double's range (about 1.8e308), in which the agent and the upstreams "
             "read numbers")
    return BodyError(400, f"number out of range at {field}",
                     f"{field}: {shortened(text, 60)} is {where}")


def unkept(value: Any) -> tuple[str, Unpaired | NonFinite | Wide] | None:
    """(path, marker) of the first value of ``value`` (read by ``read_marked`` or
    relaxed_json) that cannot be kept as sent, in document order; None when none."""
    return first_hit(value, _UNKEPT, 2**31)


def unkept_error(field: str, marker: Unpaired | NonFinite | Wide) -> str:
    """Why the value ``marker`` at ``field`` cannot be kept, the problem first (a close
    reason is cut at 123 bytes), written so that any reply or log can carry it: a lone
    surrogate, in the value or in the field's names, is spelled as its escape."""
    if isinstance(marker, Wide | PastDouble):
        refused = (wide_error if isinstance(marker, Wide) else past_double_error)(field, marker)
        text = f"{refused.message}: {refused.details}"
    elif isinstance(marker, NonFinite):
        text = nonfinite_error(field, marker)
    else:
        text = (f"{field or 'the body'}: {shortened(marker, 40)!r} holds a lone surrogate "
                "(a string cut inside a character, such as an emoji), which JSON text "
                "cannot carry")
    return text.encode("utf-8", "backslashreplace").decode()


def refuse_unkept(value: Any) -> None:
    """BodyError(400) naming the first value of ``value`` that cannot be kept as sent;
    nothing when there is none."""
    found = unkept(value)
    if found is None:
        return
    field, marker = found
    if isinstance(marker, Wide):
        raise wide_error(field, marker)
    if isinstance(marker, PastDouble):
        raise past_double_error(field, marker)
    raise BodyError(400, "invalid JSON", unkept_error(field, marker))


def reread(data: bytes, why: str) -> Any:
    """``read_marked``, for a body orjson refused (``why``, its words) or that may hold a
    wide integer; BodyError(400) when it is not JSON even so."""
    try:
        return read_marked(data)
    except RecursionError:
        # Past the interpreter's depth (orjson reads 1024 levels): no event that deep
        # could be stored anyway (orjson writes 255).
        raise BodyError(400, "invalid JSON", "nested too deeply") from None
    except ValueError:   # not JSON at all (UnicodeDecodeError is one too): orjson's words
        raise BodyError(400, "invalid JSON", why) from None


def wide_error(field: str, digits: str) -> BodyError:
    # The field in both: a websocket's close reason carries the message alone (cut at 123
    # bytes, so the problem comes first), a Segment error the details under a fixed message.
    field = shortened(field or "the body", 100)
    return BodyError(400, f"integer beyond 64 bits at {field}",
                     f"{field}: {shortened(digits, 60)} is beyond 64 bits, and a double "
                     "would round it; send it as a string")


def may_be_inexact(data: bytes) -> bool:
    """Whether orjson may have read a number of JSON ``data`` as another value: an integer
    outside the 64-bit range (a run of 20 digits, or a minus and 19), -0, or a number
    nearer zero than a double (an exponent of -100 or less, or a run of zeros)."""
    shapes = data.translate(_SHAPES)
    return (shapes.find(_TINY) >= 0 and _TINY_NUMBER.search(shapes) is not None) \
        or _wide_or_minus_zero(shapes, data)


def kept_as_sent(data: bytes) -> bool:
    """Whether JSON ``data`` (found JSON by a reader) may be stored in parts as its bytes,
    holding nothing orjson would refuse or read as another value: UTF-8, on one line (a
    dead letter export is a line an event), no number ``may_be_inexact`` names and no
    exponent of 100 or more."""
    if not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError:
            return False
    if data.find(b"\n") >= 0 or data.find(b"\r") >= 0:
        return False
    shapes = data.translate(_SIGNS_ALIKE)
    return _EXPONENT_100.search(shapes) is None and not _wide_or_minus_zero(shapes, data)


def _wide_or_minus_zero(shapes: bytes, data: bytes) -> bool:
    """``may_be_inexact``'s other numbers: -0, and integers outside the 64-bit range."""
    # find, not `in`: CPython 3.11's `bytes in bytes` first tries the needle as an int
    # and clears the TypeError, half its cost (callgrind: once per request).
    if ((shapes.find(b"-0 ") >= 0 or shapes.endswith(b"-0"))
            and _MINUS_ZERO.search(data) is not None):   # in a string too: read again
        return True
    return shapes.find(_RUN) >= 0 and (shapes.find(_LONG_RUN) >= 0
                                       or shapes.find(_NEGATIVE_RUN) >= 0)


def exactly(raw: bytes | str, value: Any) -> Any:
    """``value``, what orjson read from ``raw``, or ``raw`` read again exactly when orjson
    may have read a number as another value (``may_be_inexact``); BodyError(400) naming
    the first integer that a double would round, or number it would read as 0."""
    data = raw.encode() if isinstance(raw, str) else raw
    if not may_be_inexact(data):
        return value
    wide: list[Wide | PastDouble] = []

    def exact(text: str) -> int | float | Wide:
        number = exact_int(text)
        if isinstance(number, Wide):
            wide.append(number)
        return number

    def exact_float(text: str) -> float | NonFinite:
        number = _float(text)
        if isinstance(number, PastDouble):
            wide.append(number)
        return number

    try:
        value = json.loads(data, parse_int=exact, parse_float=exact_float)
    except RecursionError:
        # Past the interpreter's depth (orjson reads 1024 levels): no event that deep
        # could be stored anyway (orjson writes 255). orjson, the stricter reader, has
        # already refused anything else the standard library would.
        raise BodyError(400, "invalid JSON", "nested too deeply") from None
    # Walked for its path only now (long digit runs in strings are common); it may be
    # gone, overwritten by a repeated member name (the last one counts, as for orjson).
    found = first_hit(value, (Wide, PastDouble), 2**31) if wide else None
    if found is not None:
        raise (wide_error if isinstance(found[1], Wide) else past_double_error)(*found)
    return value


class Wide(str):
    """An integer's text, out of range and no double's value: what the exact parse
    leaves in its place."""


_UNKEPT = (Unpaired, NonFinite, Wide)


def means_double(text: str) -> bool:
    """Whether the integer literal ``text``, outside the 64-bit range, is a double's value:
    equal to it, or its shortest round-trip digits (JavaScript's Number to string)."""
    if len(text) > 400:   # past any double (1.8e308); and int() is slow on long digits
        return False
    double = float(text)
    if math.isinf(double):
        return False
    number = int(text)
    return int(double) == number or int(Decimal(repr(double))) == number


def exact_int(text: str) -> int | float | Wide:
    """An integer literal's value: an int in the 64-bit range, else the double it
    means, else Wide: a json.loads ``parse_int``."""
    if len(text) <= 20:
        if text == "-0":
            return -0.0   # as the upstreams read it: int() drops the sign
        number = int(text)
        if LOWEST <= number <= HIGHEST:
            return number
    return float(text) if means_double(text) else Wide(text)
