"""What the stored-as-sent property tests share: a member left out or changed, and the ways
clients write JSON (compact, as Python's json writes it with its spaces and escapes, and
with whitespace around)."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import strategies as st

ABSENT = object()   # a member left out


def changed(base: dict[str, Any], changes: list[tuple[str, Any]]) -> dict[str, Any]:
    """``base`` with each (name, value) of ``changes`` set, or left out for ABSENT."""
    out = dict(base)
    for name, value in changes:
        if value is ABSENT:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def compact(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:   # an integer past 64 bits, a lone surrogate
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass")


writers = st.sampled_from([
    compact,
    lambda v: json.dumps(v).encode(),                       # Python SDKs' and modules'
    lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass"),
    lambda v: b"  " + json.dumps(v, separators=(" , ", " : ")).encode() + b" ",
])
