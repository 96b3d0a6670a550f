"""Integers beyond 64 bits: JSON can write them, but the agent's parser reads them as
doubles. That keeps the value of 2**64 and of what JavaScript writes (18446744073709552000:
a double's shortest digits), but would forward Python's 2**64 + 1 as
1.8446744073709552e+19, a value silently changed. Every route refuses those with a 400
naming the field, as it does NaN; the others, integers at the edges of the 64-bit range,
and long digit runs inside strings are kept."""

from __future__ import annotations

import base64
import json
import tracemalloc
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dialects.body import BodyError
from agent.dialects.exact_json import parse_json
from agent.dialects.relaxed_json import parse_lenient
from tests.segment_helpers import basic, call

AUTH = {"Authorization": basic("k")}
# Just past each end of what is kept exactly (-2**63 .. 2**64 - 1), and far past: no
# double has these values.
WIDE = ["18446744073709551617", "-9223372036854775809", "1" * 41]
EDGES = ["18446744073709551615", "-9223372036854775808", "9999999999999999999"]
# Doubles' values: 2**64 exactly, and as JavaScript's JSON.stringify writes 2**64, 1e20,
# -(2**63) - 4096 (node prints these).
DOUBLES = ["18446744073709551616", "18446744073709552000", "100000000000000000000",
           "-9223372036854780000"]


def _track(value: str, quote: str = '"') -> str:
    q = quote
    return (f"{{{q}type{q}: {q}track{q}, {q}userId{q}: {q}u{q}, {q}event{q}: {q}e{q}, "
            f"{q}messageId{q}: {q}m1{q}, {q}properties{q}: {{{q}order{q}: {value}}}}}")


async def _stored(agent: Any, key: str) -> list[bytes]:
    rows = await agent.spool.fetch(agent.spool.streams[key].id, 0, 100)
    return [bytes(r.body) for r in rows]


@pytest.mark.parametrize("value", WIDE)
@pytest.mark.parametrize("quote", ['"', "'"])   # strict JSON, and the hand-written reader
async def test_segment_single_event_refuses_a_wide_integer(make_agent: Any, value: str,
                                                          quote: str) -> None:
    agent = await make_agent()
    reply = await call(agent.port, "/v1/track", _track(value, quote), headers=AUTH)
    assert reply.status == 400, reply.body
    body = orjson.loads(reply.body)
    text = body["Message"] + " " + body["Details"]
    assert "properties.order" in text and value in text and "64 bits" in text, body
    assert agent.spool.depth == 0


async def test_segment_batch_refuses_the_message_with_a_wide_integer_alone(
        make_agent: Any) -> None:
    """A 207 item naming the field; the rest of the batch is stored
    (tests/test_batch_bad_values.py)."""
    agent = await make_agent()
    good = _track("1").replace('"m1"', '"ok"')
    bad = _track(f"[1, {WIDE[0]}]")
    reply = await call(agent.port, "/v1/batch", f'{{"batch": [{good}, {bad}]}}', headers=AUTH)
    assert reply.status == 207, reply.body
    [err] = orjson.loads(reply.body)["Errors"]
    assert "batch[1].properties.order[1]" in err["Message"] + " " + err["Details"], err
    assert agent.spool.depth == 1


@pytest.mark.parametrize("value", EDGES)
async def test_integers_at_the_edges_and_digit_strings_are_kept_exactly(
        make_agent: Any, value: str) -> None:
    agent = await make_agent()
    digits = "12345678901234567890123456789"   # a long digit run, but in a string
    body = _track(value).replace('"order"', f'"label": "{digits}", "order"')
    reply = await call(agent.port, "/v1/track", body, headers=AUTH)
    assert reply.status == 200, reply.body
    [stored] = await _stored(agent, "k")
    assert f'"order":{value}'.encode() in stored and f'"{digits}"'.encode() in stored


@pytest.mark.parametrize("value", DOUBLES)
async def test_integers_that_are_a_doubles_value_are_kept_as_that_double(
        make_agent: Any, value: str) -> None:
    agent = await make_agent()
    reply = await call(agent.port, "/v1/track", _track(value), headers=AUTH)
    assert reply.status == 200, reply.body
    [stored] = await _stored(agent, "k")
    assert orjson.loads(stored)["properties"]["order"] == float(value)


@pytest.mark.parametrize("value", WIDE)
async def test_nucleus_http_leaves_out_an_event_with_a_wide_id_or_property(
        make_agent: Any, caplog: Any, value: str) -> None:
    """A module resends its unacknowledged queue in every message: the event alone is
    refused, left out of `reportedIds` (tests/test_nucleus_bad_event.py)."""
    agent = await make_agent()
    async with aiohttp.ClientSession() as s:
        for app, event, field in (
                ("a", f'{{"type": "event", "name": "e", "id": {value}}}', "data[0].id"),
                ("b", f'{{"type": "event", "name": "e", "id": 1, "payload": {{"n": {value}}}}}',
                 "data[0].payload.n")):   # an app each: the log is limited per app
            async with s.post(f"http://127.0.0.1:{agent.port}/app/{app}/track",
                              data=f'{{"data": [{event}]}}') as r:
                assert r.status == 200
                assert await r.json() == {"reportedIds": []}
            logged = [r.getMessage() for r in caplog.records if "64 bits" in r.getMessage()]
            assert logged and field in logged[-1] and value[:57] in logged[-1], logged
    assert agent.spool.depth == 0


W = int(WIDE[0])
_TRACK = {"type": "track", "event": "e", "userId": "u", "messageId": "m1"}
_ROUTES = [   # (path, headers, body, the field as named)
    ("/api/public/apps/track", {"PublicWriteKey": "k"},
     {**_TRACK, "properties": {"n": W}}, "properties.n"),
    ("/api/public/apps/batch", {"PublicWriteKey": "k"},
     {"batch": [{**_TRACK, "properties": {"n": W}}]}, "batch[0].properties.n"),
    ("/v1/capture", {"X-Write-Key": "k"}, {"batch": [{**_TRACK, "properties": {"n": [W]}}]},
     "batch[0].properties.n[0]"),
    ("/track", {"Authorization": basic("k")},
     {"hitId": "h1", "event": {"name": "n", "user": {"userId": "u"}, "value": W}},
     "event.value"),
    ("/v1/import", AUTH, {"batch": [{**_TRACK, "properties": {"n": W}}]},
     "batch[0].properties.n"),
    ("/v1/webhook?writeKey=k", {}, {**_TRACK, "properties": {"n": W}}, "properties.n"),
    # Over 64 KB: parsed on the worker thread, not the loop (dialects/offload.py).
    ("/v1/batch", AUTH, {"batch": [{**_TRACK, "messageId": f"m{i}", "properties": {
        "pad": "x" * 1000, "n": W}} for i in range(100)]}, "batch[99].properties.n"),
]


@pytest.mark.parametrize("path,headers,body,field", _ROUTES)
async def test_every_route_refuses_a_wide_integer_naming_it(
        make_agent: Any, path: str, headers: dict[str, str], body: Any, field: str) -> None:
    agent = await make_agent()
    reply = await call(agent.port, path, json.dumps(body), headers=headers)
    assert reply.status == 400, reply.body
    assert field in reply.body.decode() and "64 bits" in reply.body.decode(), reply.body
    assert agent.spool.depth == 0


async def test_the_pixel_refuses_a_wide_integer_naming_it(make_agent: Any) -> None:
    agent = await make_agent()
    data = base64.urlsafe_b64encode(
        json.dumps({**_TRACK, "writeKey": "k", "properties": {"n": W}}).encode()).decode()
    reply = await call(agent.port, f"/v1/pixel/track?data={data}", method="GET")
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/gif"
    problem = reply.headers.get("X-Outpost-Error", "")
    assert "properties.n" in problem and "64 bits" in problem, problem
    assert agent.spool.depth == 0


@pytest.mark.parametrize("value", ["1.5", "-0.0", "1e30", "0.30000000000000004",
                                   "3.14159265358979323846264338327950288"])
async def test_floats_in_hand_written_json_are_kept(make_agent: Any, value: str) -> None:
    agent = await make_agent()
    reply = await call(agent.port, "/v1/track", _track(value, "'"), headers=AUTH)
    assert reply.status == 200, reply.body
    [stored] = await _stored(agent, "k")
    assert orjson.loads(stored)["properties"]["order"] == float(value)


async def test_a_long_field_name_still_gets_a_readable_close_reason(make_agent: Any) -> None:
    """The reason is cut to a websocket's 123 bytes on a character boundary, the problem
    first: cut inside a character it was invalid UTF-8, and the client saw an error
    instead of the close."""
    agent = await make_agent()
    name = "x" + "\u00e9" * 200
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(f"http://127.0.0.1:{agent.port}/app/k/track") as ws:
        # No id: nothing to leave unacknowledged, so the message is refused.
        await ws.send_bytes(f'{{"data": [{{"type": "event", "p": {{"{name}": '
                            f'{WIDE[0]}}}}}]}}'.encode())
        closed = await ws.receive(timeout=5)
    assert closed.type == WSMsgType.CLOSE and closed.data == 1007, closed
    assert closed.extra.startswith("integer beyond 64 bits at data[0].p.x\u00e9"), closed.extra


def test_a_wide_integer_is_found_in_bounded_memory() -> None:
    """A long member name over a long list, and one integer to refuse: spelling a path
    for every node took 400 MB for this 60 KB body."""
    raw = json.dumps({"n" * 20_000: list(range(20_000)), "z": W}).encode()
    tracemalloc.start()
    try:
        with pytest.raises(BodyError, match="64 bits"):
            parse_json(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * len(raw), peak   # 6.5 MB here


def test_too_deep_for_the_exact_reader_is_a_400() -> None:
    raw = b"[" * 1000 + b'"1234567890123456789012"' + b"]" * 1000   # orjson reads 1024
    with pytest.raises(BodyError) as refused:
        parse_json(raw)
    assert (refused.value.status, refused.value.details) == (400, "nested too deeply")


async def test_nucleus_websocket_leaves_out_an_event_with_a_wide_id(make_agent: Any) -> None:
    agent = await make_agent()
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(f"http://127.0.0.1:{agent.port}/app/k/track") as ws:
        await ws.send_str(f'{{"data": [{{"type": "event", "name": "e", "id": {WIDE[0]}}}, '
                          '{"type": "event", "name": "e", "id": 2}]}')
        assert await ws.receive_json(timeout=5) == {"reportedIds": [2]}
    assert agent.spool.depth == 1


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.text(max_size=30)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.from_regex(r"\A[1-9][0-9]{18,25}\Z").map(int)   # mostly near the edges
    | st.floats(min_value=-1e25, max_value=1e25).map(lambda f: int(Decimal(repr(f)))),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


def _wide(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -(2**63) <= value <= 2**64 - 1 and value != int(float(value)) \
            and value != int(Decimal(repr(float(value))))
    if isinstance(value, list):
        return any(map(_wide, value))
    if isinstance(value, dict):
        return any(map(_wide, value.values()))
    return False


@settings(max_examples=400, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_a_body_is_read_exactly_or_refused(value: Any, lenient: bool) -> None:
    """Whatever the integers, the reader returns what was written (the standard library's
    exact reading, with a double for an integer that is a double's value), or refuses the
    body naming an integer that a double would round."""
    raw = json.dumps({"v": value}).encode()
    read = parse_lenient if lenient else parse_json
    try:
        got = read(raw)
    except BodyError as exc:
        assert _wide(value) and "beyond 64 bits" in exc.message, (raw, exc.message)
        return
    assert not _wide(value), raw
    assert got == json.loads(raw, parse_int=_as_read)


def _as_read(text: str) -> int | float:
    number = int(text)
    return number if -(2**63) <= number <= 2**64 - 1 else float(text)


def test_a_wide_integer_overwritten_by_a_repeated_member_is_not_refused() -> None:
    """The last of a repeated member counts (as orjson reads it): the wide one is gone."""
    assert parse_json(b'{"a": 18446744073709551617, "a": 1}') == {"a": 1}
    with pytest.raises(BodyError, match="beyond 64 bits"):
        parse_json(b'{"a": 1, "a": 18446744073709551617}')


def test_nineteen_digit_values_are_not_parsed_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A nanosecond timestamp has 19 digits, and no 19-digit integer is out of range but a
    negative one: such bodies skip the exact parse (the standard library's, several times
    orjson's cost), which a longer run or a minus before one still gets."""
    parsed: list[bytes] = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda data, **kw: parsed.append(data) or real(data, **kw))
    for body in (b'{"ns": 1701234567890123456, "s": "1701234567890123456"}',
                 b'{"ns": 12345678901234567890}', b'{"ns": -1234567890123456789}'):
        parse_json(body)
    assert parsed == [b'{"ns": 12345678901234567890}', b'{"ns": -1234567890123456789}']
