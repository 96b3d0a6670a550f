"""A forgiving JSON reader, tried only after strict JSON has failed.

The MetaRouter seed's own example requests are written the way people write
JSON by hand: 'single quotes', Python's True/False/None, bare words such as
`'type': identify`, trailing commas and missing commas between members. An
app that copies them must still be served (the seed examples are the
contract), so the Segment single-event routes fall back to this reader.
Anything it cannot read is still a 400, and nesting is bounded.

Bare words are kept as strings, but never the ones that spell a number JSON
does not have (NaN, Infinity, Python's nan/inf), a number too large for a
double, nor an integer beyond 64 bits that a double would round (exact_json.py):
those are a 400 naming the field, never a value silently changed.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from agent.dialects.body import BodyError
from agent.dialects.exact_json import means_double, nonfinite_error, refuse_wide, wide_error

MAX_DEPTH = 64
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
            out.append(("value", orjson.loads(raw)))
        elif kind == "sq":
            inner = re.sub(r"\\'", "'", raw[1:-1]).replace('"', '\\"')
            out.append(("value", orjson.loads(f'"{inner}"')))
        elif kind == "num":
            try:
                number = orjson.loads(raw)
            except orjson.JSONDecodeError:  # past a double's range
                number = None
            if raw.lstrip("-").isdigit() and not isinstance(number, int) \
                    and not means_double(raw):
                out.append((_WIDE, raw))        # orjson would round the integer
            elif number is None:
                out.append((_NONFINITE, raw))   # it would be infinity
            else:
                out.append(("value", number))
        elif kind == _NONFINITE:
            out.append((_NONFINITE, raw))
        elif kind == "word":
            out.append(("value", _WORDS.get(raw, raw)))
        else:
            out.append((raw, None))
    return out


class _Unkept(Exception):
    """A value that cannot be kept: not JSON (NaN), or an integer beyond 64 bits (wide).
    ``where`` collects the path as the parser unwinds, so well-formed bodies pay nothing
    for path tracking."""

    def __init__(self, raw: str, wide: bool) -> None:
        super().__init__(raw)
        self.raw = raw
        self.wide = wide
        self.where: list[str] = []

    def error(self) -> BodyError:
        field = "".join(reversed(self.where)).lstrip(".")
        if self.wide:
            return wide_error(field, self.raw)
        return BodyError(400, "invalid JSON", nonfinite_error(field, self.raw))


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
        if kind in (_NONFINITE, _WIDE):
            raise _Unkept(val, kind == _WIDE)
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
                try:
                    arr.append(self.value(depth + 1))
                except _Unkept as exc:
                    exc.where.append(f"[{len(arr)}]")
                    raise
                continue
            kind, name = self.next()
            if kind != "value" or not isinstance(name, str):
                raise BodyError(400, "invalid JSON", "expected a member name")
            if self.next()[0] != ":":
                raise BodyError(400, "invalid JSON", f"expected ':' after {name!r}")
            try:
                obj[name] = self.value(depth + 1)
            except _Unkept as exc:
                exc.where.append(f".{name}")
                raise


def loads(raw: bytes) -> dict[str, Any]:
    """Read a hand-written JSON object; raises BodyError(400) if it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, "invalid JSON", "body is not UTF-8") from exc
    try:
        parser = _Parser(_tokens(text))
        if parser.peek() != "{":
            raise BodyError(400, "invalid JSON", "expected an object")
        result = parser.value(0)
    except orjson.JSONDecodeError as exc:
        raise BodyError(400, "invalid JSON", str(exc)) from exc
    except _Unkept as exc:
        raise exc.error() from None
    if parser.peek() != "end":
        raise BodyError(400, "invalid JSON", "data after the object")
    assert isinstance(result, dict)
    return result


def parse_lenient(raw: bytes) -> Any:
    """Strict JSON first (the fast path every real client takes), then ``loads``."""
    if not raw:
        raise BodyError(400, "empty body: expected JSON")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return loads(raw)
    refuse_wide(raw)
    return value
