"""The bytes-level check (exact_json.may_be_inexact) sends to the exact reading every body
in which orjson read a number as another value: a wide integer, a -0, a number nearer zero
than a double. It is a search of bytes, cheaper than a second parse, so it is tuned for
cost; this holds any version of it to the exact reading on generated bodies (numbers of
every shape, each byte that may end one, strings that look like them)."""

from __future__ import annotations

import json
import math
import random
import uuid
from typing import Any

import orjson

from agent.dialects.exact_json import exact_int, may_be_inexact, underflows

_SPACE = [" ", "\t", "\n", "\r", ""]
_LOOKALIKES = ["item-0", "5e-123", "a-1", "release-123", "-0", "1e-400"]


def _number(rnd: random.Random) -> str:
    digits = rnd.choice(["0", str(rnd.randint(1, 9)), str(rnd.randint(1, 10**rnd.randint(1, 25)))])
    frac = rnd.choice(["", "." + "0" * rnd.randint(0, 30) + str(rnd.randint(0, 99))])
    exp = rnd.choice(["", "", rnd.choice("eE") + rnd.choice(["", "-", "+", "-"])
                      + "0" * rnd.randint(0, 2) + str(rnd.randint(0, 1200))])
    return rnd.choice(["", "-"]) + digits + frac + exp


def _value(rnd: random.Random, depth: int = 0) -> str:
    pick = rnd.random()
    if pick < 0.5 or depth > 3:
        return _number(rnd)
    if pick < 0.6:
        return json.dumps(rnd.choice(_LOOKALIKES))
    items = [rnd.choice(_SPACE) + _value(rnd, depth + 1) + rnd.choice(_SPACE)
             for _ in range(rnd.randint(0, 4))]
    if pick < 0.8:
        return "[" + ",".join(items) + "]"
    return "{" + ",".join(f'"k{i}":{item}' for i, item in enumerate(items)) + "}"


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def test_every_body_orjson_reads_otherwise_goes_to_the_exact_reading() -> None:
    rnd = random.Random(11)
    checked = 0
    for _ in range(4000):
        text = rnd.choice(_SPACE) + _value(rnd) + rnd.choice(_SPACE)
        try:
            fast = orjson.loads(text)
        except orjson.JSONDecodeError:
            continue
        refused: list[str] = []

        def as_int(literal: str) -> Any:
            number = exact_int(literal)
            if not isinstance(number, int | float):
                refused.append(literal)
            return number

        def as_float(literal: str) -> float:
            number = float(literal)
            if underflows(literal, number):
                refused.append(literal)
            return number

        exact = json.loads(text, parse_int=as_int, parse_float=as_float)
        checked += 1
        if refused or not _same(fast, exact):
            assert may_be_inexact(text.encode()), (text, refused)
    assert checked > 3000


def test_a_batch_of_uuid_message_ids_is_read_by_orjson_alone() -> None:
    """Segment's SDKs give each message a uuid4 `messageId`, and about one in 25 holds a
    digit, an `e`, a dash and three digits ("...9e-4123-..."), the shape of an exponent of
    -100 or less: nearly every 100-message batch was read a second time by the exact reader,
    ~9x orjson's time (bench/RESULTS.md run 59). An exponent is a number's only where a
    byte that may end a number follows its digits, never inside a string of hex digits."""
    rnd = random.Random(25)
    for _ in range(200):
        batch = {"batch": [{"type": "track", "event": "Clicked", "userId": "u-1",
                            "messageId": str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
                            "timestamp": "2026-01-15T10:20:30.123Z"} for _ in range(100)],
                 "sentAt": "2026-01-15T10:20:31.000Z"}
        raw = orjson.dumps(batch)
        assert not may_be_inexact(raw), raw
    for tiny in ("1e-400", "5E-123", "2.5e-0100", "7e-999"):   # a number's still is
        for end in (",", "]", "}", " ", "\t", "\n", "\r", ""):
            assert may_be_inexact(f'{{"a":[{tiny}{end}'.encode()), (tiny, end)
