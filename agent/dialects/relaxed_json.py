"""A forgiving JSON reader, tried only after strict JSON has failed.

The MetaRouter seed's own example requests are written the way people write
JSON by hand: 'single quotes', Python's True/False/None, bare words such as
`'type': identify`, trailing commas and missing commas between members. An
app that copies them must still be served (the seed examples are the
contract), so the Segment single-event routes fall back to this reader.
Anything it cannot read is still a 400, and nesting is bounded.

Bare words are kept as strings, but never the ones that spell a number JSON
does not have (NaN, Infinity, Python's nan/inf), a number too large for a
double or nearer zero than one, nor an integer beyond 64 bits that a double would round (exact_json.py), nor
a string holding a lone surrogate: each is left as exact_json's marker, to be named,
never a value silently changed (a 400 for a single call, the message alone in a batch:
batch_json.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from agent.dialects.body import BodyError
from agent.dialects.exact_json import (
    NonFinite,
    PastDouble,
    Unpaired,
    Wide,
    exactly,
    means_double,
    read_marked,
    refuse_unkept,
    underflows,
)

MAX_DEPTH = 64
# Read by hand (``loads``, pure Python: ~0.6 s a MiB of small values) only up to this size:
# hand-written bodies are small, and a larger one would hold the parsing worker that long.
HAND_WRITTEN_MAX = 1024 * 1024
# What a file saved as UTF-8 by Windows PowerShell 5 (or old Notepad) starts with.
BOM = b"\xef\xbb\xbf"
BOM_REFUSED = "UTF-8 byte order mark (BOM) is not supported: line 1 column 1 (char 0)"
_TOKEN = re.compile(r"""
    \s*(?:
      (?P<punct>[{}\[\]:,])
    | (?P<dq>"(?:[^"\\]|\\.)*")
    | (?P<sq>'(?:[^'\\]|\\.)*')
    | (?P<nonfinite>[-+]?(?i:nan|inf(?:inity)?)(?![\w$.\-/@]))
    | (?P<num>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?(?![\w.$-]))
    | (?P<word>[A-Za-z_$][\w$.\-/@]*)
    )""", re.VERBOSE | re.DOTALL)
_NONFINITE = "nonfinite"
_WIDE = "wide"   # an integer beyond 64 bits
_PAST = "past"   # a number past a double's range
_WORDS = {"true": True, "True": True, "false": False, "False": False, "null": None,
          "None": None}


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    end = len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise BodyError(400, "invalid JSON", f"unexpected character at offset {pos}")
        pos = m.end()
        kind = m.lastgroup
        raw = m.group(kind or "")
        if kind == "dq":
            out.append(("value", _string(raw)))
        elif kind == "sq":
            inner = re.sub(r"\\'", "'", raw[1:-1]).replace('"', '\\"')
            out.append(("value", _string(f'"{inner}"')))
        elif kind == "num":
            try:
                number = orjson.loads(raw)
            except orjson.JSONDecodeError:  # past a double's range
                number = None
            if raw == "-0":
                number = -0.0   # as the upstreams read it: orjson reads the integer 0
            if raw.lstrip("-").isdigit() and not isinstance(number, int) \
                    and not means_double(raw):
                out.append((_WIDE, raw))        # orjson would round the integer
            elif number is None or (type(number) is float and underflows(raw, number)):
                out.append((_PAST, raw))   # it would be infinity, or 0
            else:
                out.append(("value", number))
        elif kind == _NONFINITE:
            out.append((_NONFINITE, raw))
        elif kind == "word":
            out.append(("value", _WORDS.get(raw, raw)))
        else:
            out.append((raw, None))
    return out


def _string(quoted: str) -> str:
    try:
        return str(orjson.loads(quoted))
    except orjson.JSONDecodeError as exc:   # a lone surrogate ("\\ud83d"), or not a string
        try:
            text = json.loads(quoted)
        except ValueError:
            raise BodyError(400, "invalid JSON", str(exc)) from None
        return Unpaired(text)   # orjson reads every other string the standard library does


class _Parser:
    def __init__(self, tokens: list[tuple[str, Any]]) -> None:
        self.tokens = tokens
        self.i = 0

    def peek(self) -> str:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else "end"

    def next(self) -> tuple[str, Any]:
        if self.i >= len(self.tokens):
            raise BodyError(400, "invalid JSON", "unexpected end of body")
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise BodyError(400, "invalid JSON", "nested too deeply")
        kind, val = self.next()
        if kind == "value":
            return val
        if kind == _NONFINITE:
            return NonFinite(val)
        if kind == _WIDE:
            return Wide(val)
        if kind == _PAST:
            return PastDouble(val)
        if kind in ("{", "["):
            return self.container(kind, depth)
        raise BodyError(400, "invalid JSON", f"unexpected {kind!r}")

    def container(self, opener: str, depth: int) -> Any:
        closer = "}" if opener == "{" else "]"
        obj: dict[str, Any] = {}
        arr: list[Any] = []
        while True:
            while self.peek() == ",":  # trailing, doubled and leading commas are forgiven
                self.next()
            if self.peek() == closer:
                self.next()
                return obj if opener == "{" else arr
            if opener == "[":
                arr.append(self.value(depth + 1))
                continue
            kind, name = self.next()
            if kind != "value" or not isinstance(name, str):
                raise BodyError(400, "invalid JSON", "expected a member name")
            if self.next()[0] != ":":
                raise BodyError(400, "invalid JSON", f"expected ':' after {name!r}")
            value = self.value(depth + 1)
            # A name with a lone surrogate is marked where a path can find it: its value.
            obj[name] = value if type(name) is str else name


def loads(raw: bytes) -> dict[str, Any]:
    """Read a hand-written JSON object, what JSON cannot carry left as a marker (as
    exact_json.read_marked leaves it); raises BodyError(400) if it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, "invalid JSON", "body is not UTF-8") from exc
    parser = _Parser(_tokens(text))
    if parser.peek() != "{":
        raise BodyError(400, "invalid JSON", "expected an object")
    result = parser.value(0)
    if parser.peek() != "end":
        raise BodyError(400, "invalid JSON", "data after the object")
    assert isinstance(result, dict)
    return result


def reread(data: bytes) -> Any:
    """A body orjson refused, or that may hold a wide integer or a -0, read
    with each value JSON cannot carry left as a marker: strict JSON by the standard
    library, else as written by hand (``loads``)."""
    try:
        return read_marked(data)
    except RecursionError:
        raise BodyError(400, "invalid JSON", "nested too deeply") from None
    except UnicodeDecodeError:
        raise BodyError(400, "invalid JSON", "body is not UTF-8") from None
    except ValueError as exc:
        if data.startswith(BOM):
            # The mark is invisible in an editor: the hand-written reader's "unexpected
            # character at offset 0" hid it. Named in the words every other API uses (orjson's).
            raise BodyError(400, "invalid JSON", BOM_REFUSED) from None
        if len(data) > HAND_WRITTEN_MAX:
            raise BodyError(400, "invalid JSON", f"{exc} (a body over {HAND_WRITTEN_MAX} "
                            "bytes is read as strict JSON only)") from None
        return loads(data)


def parse_lenient(raw: bytes) -> Any:
    """Strict JSON first (the fast path every real client takes), then ``reread``; a
    value JSON cannot carry is a 400 naming its field."""
    if not raw:
        raise BodyError(400, "empty body: expected JSON")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = reread(raw)
        refuse_unkept(value)
        return value
    return exactly(raw, value)
