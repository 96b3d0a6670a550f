"""A number nearer zero than any double (1e-400): JSON can write it, but every reader here
and upstream keeps numbers as doubles, where it is 0. orjson read `1e-400` as 0.0 and the
agent stored and forwarded `0.0` (`-1e-400` as `-0.0`): a value silently changed. Every
route refuses it with a 400 naming the field, as it refuses 1e400; in a batch, the item
holding one alone. A subnormal (1e-320) is a double's value, and is delivered as one."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from agent.dialects.exact_json import may_be_inexact
from tests.segment_helpers import basic, call, wait_for
from tests.test_negative_zero import RawUpstream, raw_upstream  # noqa: F401  (a fixture)

AUTH = {"Authorization": basic("k")}
TINY = ["1e-400", "-1e-400", "1E-400", "0.1e-330", "123e-999", "1.5e-0400", "4e-325"]


def _track(value: str, quote: str = '"') -> str:
    q = quote
    return (f"{{{q}type{q}: {q}track{q}, {q}userId{q}: {q}u{q}, {q}event{q}: {q}e{q}, "
            f"{q}messageId{q}: {q}m1{q}, {q}properties{q}: {{{q}t{q}: {value}}}}}")


def _routes(value: str) -> list[tuple[str, str, dict[str, str], str]]:
    """(route, body, headers, the field the refusal names) with ``value`` in one event."""
    track = _track(value)
    return [
        ("/v1/track", track, AUTH, "properties.t"),
        ("/v1/track", _track(value, "'"), AUTH, "properties.t"),   # hand-written reader
        ("/api/public/apps/track", track, {"PublicWriteKey": "k"}, "properties.t"),
        ("/track", f'{{"hitId": "h1", "event": {{"name": "e", "t": {value}, '
                   '"user": {"userId": "u"}}}', AUTH, "event.t"),
        ("/app/k/track", f'{{"data": [{{"type": "event", "name": "e", '
                         f'"payload": {{"t": {value}}}}}]}}', {}, "data[0].payload.t"),
        ("/v1/capture", f'{{"batch": [{track}]}}', {"X-Write-Key": "k"},
         "batch[0].properties.t"),
    ]


@pytest.mark.parametrize("value", TINY)
@pytest.mark.parametrize("case", range(6))
async def test_a_number_nearer_zero_than_a_double_is_refused_naming_it(
        make_agent: Any, value: str, case: int) -> None:
    agent = await make_agent()
    route, body, headers, field = _routes(value)[case]
    reply = await call(agent.port, route, body, headers=headers)
    assert reply.status == 400, (route, reply.status, reply.body)
    text = reply.body.decode()
    assert field in text and value in text and "out of range" in text, text
    assert agent.spool.depth == 0


@pytest.mark.parametrize("value", TINY)
async def test_a_batch_refuses_the_tiny_item_alone(make_agent: Any, value: str) -> None:
    agent = await make_agent()
    good = '{"type": "track", "userId": "u", "event": "e", "messageId": "ok"}'
    bad = (f'{{"type": "track", "userId": "u", "event": "e", "messageId": "bad", '
           f'"properties": {{"n": [1, {value}]}}}}')
    reply = await call(agent.port, "/v1/batch", f'{{"batch": [{good}, {bad}]}}', headers=AUTH)
    assert reply.status == 207, reply.body
    [err] = reply.json()["Errors"]
    text = err["Message"] + " " + err["Details"]
    assert "out of range" in text and "batch[1].properties.n[1]" in text, err
    assert agent.spool.depth == 1
    # A Nucleus message's: left out of the acknowledgement (a module's reply has no room
    # for a reason; the log has it), the good one stored.
    reply = await call(agent.port, "/app/k/track", '{"data": [{"name": "e", "id": 1}, '
                       f'{{"name": "e", "id": 2, "payload": {{"t": {value}}}}}]}}')
    assert reply.status == 200 and reply.json() == {"reportedIds": [1]}, reply.body
    assert agent.spool.depth == 2


async def test_the_upstream_gets_a_subnormal_and_never_a_zero_for_a_tiny(
        make_agent: Any, raw_upstream: RawUpstream) -> None:  # noqa: F811
    agent = await make_agent(upstreams=[{
        "name": "up", "protocol": "segment-http", "url": f"http://127.0.0.1:{raw_upstream.port}",
        "flush_interval_s": 0.05, "timeout_s": 2}])
    events = [_track(v).replace('"m1"', f'"m{i}"') for i, v in
              enumerate(["1e-400", "1e-320", "-1e-400", "5e-324", "2.2250738585072014e-308"])]
    reply = await call(agent.port, "/v1/batch", '{"batch": [' + ", ".join(events) + "]}",
                       headers=AUTH)
    assert reply.status == 207, reply.body
    assert len(reply.json()["Errors"]) == 2, reply.body
    await wait_for(lambda: len(raw_upstream.events("batch")) == 3)
    got = {ev["messageId"]: ev["properties"]["t"] for ev in raw_upstream.events("batch")}
    assert got == {"m1": 1e-320, "m3": 5e-324, "m4": 2.2250738585072014e-308}, raw_upstream.bodies


@pytest.mark.parametrize("body,inexact", [
    (b'{"a":1e-400}', True), (b'{"a":1E-324}', True), (b'{"a":[2e-0005]}', True),
    (b'{"a":1e-5}', False), (b'{"a":1.5e-99}', False), (b'{"a":"one-time"}', False),
    # Strings whose words end in e before a dash and digits: ids, versions, names.
    (b'{"a":"release-123"}', False), (b'{"device":"device-1024"}', False),
    (b'{"a":1e+400}', False),   # orjson refuses it: read again as a refusal, not here
    (b'1e-400', True), (b'[-1,0.5E-1000]', True), (b'{"a":1.0e-0100,"b":-1}', True),
    (b'{"a":-1e-99,"b":"e-400"}', False),
])
def test_only_a_long_negative_exponent_sends_a_body_to_the_exact_reading(
        body: bytes, inexact: bool) -> None:
    """A number can read as 0 only with an exponent of three digits or more, or with more
    zeros than the wide-integer check already sends there (a run of 20 digits)."""
    assert may_be_inexact(body) is inexact


async def test_a_websocket_message_leaves_the_tiny_event_out_of_its_acknowledgement(
        make_agent: Any) -> None:
    agent = await make_agent()
    frame = '{"data": [{"name": "e", "id": 1, "payload": {"t": 1e-400}}, {"name": "e", "id": 2}]}'
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(f"http://127.0.0.1:{agent.port}/app/k/track") as ws:
        await ws.send_str(frame)
        assert await ws.receive_json() == {"reportedIds": [2]}
    assert agent.spool.depth == 1
