"""One bad event in a Nucleus `{"data": [...]}` message refuses that event alone.

Real modules resend their whole unacknowledged queue in every message: refusing a message
for one event (a lone surrogate, as nucleus-nodejs writes for a sliced emoji; Python's NaN;
an integer a double would round; a non-string name; nesting too deep) refused every
later message of the app too, for good. The bad event is left out of `reportedIds`
(never acknowledged, never changed), the rest is stored and delivered."""

from __future__ import annotations

import tracemalloc
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType

from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, nucleus_up, segment_up, wait_for


def good(i: Any, name: str = "good") -> bytes:
    return orjson.dumps({"type": "event", "name": name, "id": i, "sessionId": 1,
                         "machineId": "m"})


def nest(n: int) -> str:
    return "[" * n + "1" + "]" * n


# (what is wrong, the bad event's JSON as a client writes it, what the log names)
BAD = [
    ("lone surrogate", '{"type":"event","name":"bad","id":2,"machineId":"m",'
                       '"payload":{"s":"\\ud83d"}}', "surrogate"),
    ("NaN", '{"type":"event","name":"bad","id":2,"machineId":"m","payload":{"x":NaN}}',
     "payload.x"),
    ("Infinity", '{"type":"event","name":"bad","id":2,"machineId":"m",'
                 '"payload":{"x":-Infinity}}', "payload.x"),
    ("wide integer", '{"type":"event","name":"bad","id":2,"machineId":"m",'
                     '"payload":{"n":18446744073709551617}}', "payload.n"),
    ("name not a string", '{"type":"event","name":5,"id":2,"machineId":"m"}', "name"),
    ("type not a string", '{"type":["event"],"name":"bad","id":2,"machineId":"m"}', "type"),
    ("too deep", '{"type":"event","name":"bad","id":2,"machineId":"m","x":'
                 + nest(300) + '}', "nested"),
]


def message(bad: str, *more: bytes) -> bytes:
    return b'{"data":[' + b",".join([good(1), bad.encode(), good(3), *more]) + b"]}"


@pytest.mark.parametrize("what,bad,named", BAD, ids=[b[0] for b in BAD])
async def test_over_http_the_bad_event_alone_is_left_unacknowledged(
        make_agent: Any, fake_nucleus: FakeNucleus, caplog: Any,
        what: str, bad: str, named: str) -> None:
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    reply = await call(agent.port, "/app/k/track", message(bad))
    assert reply.status == 200, reply.body
    assert reply.json() == {"reportedIds": [1, 3]}
    await wait_for(lambda: len(fake_nucleus.events) == 2)
    assert fake_nucleus.ids() == [1, 3]
    assert agent.metrics.refused[("nucleus", 400)] == 1   # counted
    logged = [r.getMessage() for r in caplog.records if "left unacknowledged" in r.getMessage()]
    assert len(logged) == 1 and named in logged[0], logged


async def test_an_id_holding_a_lone_surrogate_is_named_as_json_in_the_log(
        make_agent: Any, caplog: Any) -> None:
    """The warning names the id of the event left out as JSON (operations.md); one holding
    a lone surrogate, which orjson does not write, was named "an array nested too deeply"."""
    agent = await make_agent()
    bad = '{"type":"event","name":"bad","id":"id-\\ud83d","machineId":"m"}'
    reply = await call(agent.port, "/app/k/track", message(bad))
    assert reply.status == 200 and reply.json() == {"reportedIds": [1, 3]}, reply.body
    logged = [r.getMessage() for r in caplog.records if "left unacknowledged" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith('event id "id-\\ud83d" of app'), logged


async def test_over_the_websocket_the_module_queue_is_not_blocked(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """The audit's repro: a module's queue holding one sliced emoji was refused frame after
    frame (11 frames, 11 closes, 0 acks). Each frame now acks all but that event."""
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    bad = BAD[0][1]
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(f"http://127.0.0.1:{agent.port}/k") as ws:
        for later in (4, 5, 6):   # the queue resent, with one more event each time
            await ws.send_str(message(bad, good(later)).decode())
            reply = await ws.receive(timeout=5)
            assert reply.type == WSMsgType.TEXT, reply
            assert orjson.loads(reply.data) == {"reportedIds": [1, 3, later]}
    await wait_for(lambda: len(fake_nucleus.events) == 5)
    assert sorted(fake_nucleus.ids()) == [1, 3, 4, 5, 6]


async def test_nan_is_never_stored_as_null(make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """A message holding nothing but the NaN event: acknowledged with no id, nothing stored."""
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    reply = await call(agent.port, "/app/k/track", f'{{"data":[{BAD[1][1]}]}}')
    assert reply.status == 200 and reply.json() == {"reportedIds": []}, reply.body
    assert agent.spool.depth == 0


async def test_a_good_event_sharing_the_id_of_a_refused_one_is_stored(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """Ids collide across sessions: the refused event is left out by its place in the
    message, not by its id (which is acked for the good one)."""
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    body = b'{"data":[' + BAD[1][1].encode() + b"," + good(2, "twin") + b"]}"
    reply = await call(agent.port, "/app/k/track", body)
    assert reply.status == 200 and reply.json() == {"reportedIds": [2]}, reply.body
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    assert fake_nucleus.events[0]["name"] == "twin"


async def test_a_bad_event_without_an_id_still_refuses_its_message(make_agent: Any) -> None:
    """Nothing to leave out of the acks: the message is refused, as an oversize one is."""
    agent = await make_agent()
    body = b'{"data":[' + good(1) + b',{"type":"event","name":"n","payload":{"x":NaN}}]}'
    reply = await call(agent.port, "/app/k/track", body)
    assert reply.status == 400, reply.body
    assert "data[1].payload.x" in reply.json()["error"]
    assert agent.spool.depth == 0


# Not UTF-8 (the standard library's reader, used for a message orjson refuses, would guess
# UTF-16 or UTF-32, or skip a BOM: review17 L3); the Segment routes refuse them too.
NOT_UTF8 = [('{"data":[' + good(1).decode() + "]}").encode(enc)
            for enc in ("utf-16", "utf-32-le", "utf-8-sig")]


@pytest.mark.parametrize("body", [b'{"data":[1,', b'{"data":{"a":NaN}}', b"[NaN]", *NOT_UTF8])
async def test_a_message_that_is_not_json_or_has_no_data_array_is_refused_whole(
        make_agent: Any, body: bytes) -> None:
    agent = await make_agent()
    reply = await call(agent.port, "/app/k/track", body)
    assert reply.status == 400, reply.body
    assert agent.spool.depth == 0


# M3: nested deeper than the other family can write once mapped (orjson writes 254 levels;
# the mapping puts a field 2 levels deeper: context.nucleus, payload.$segment).

async def test_a_nucleus_event_too_deep_to_map_is_left_out_not_dead_lettered(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    deep = '{"type":"event","name":"deep","id":2,"machineId":"m","extra":' + nest(252) + "}"
    reply = await call(agent.port, "/app/k/track", message(deep))
    assert reply.status == 200 and reply.json() == {"reportedIds": [1, 3]}, reply.body
    await wait_for(lambda: len(fake_segment.events) == 2)
    assert not agent.spool.counters.get("dead_lettered")


async def test_a_nucleus_event_at_the_depth_limit_is_delivered_mapped(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """The limit is no stricter than it must be: one level less maps and is delivered."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    deep = '{"type":"event","name":"deep","id":2,"machineId":"m","extra":' + nest(250) + "}"
    reply = await call(agent.port, "/app/k/track", message(deep))
    assert reply.status == 200 and reply.json() == {"reportedIds": [1, 2, 3]}, reply.body
    await wait_for(lambda: len(fake_segment.events) == 3)
    assert not agent.spool.counters.get("dead_lettered")


WIDE = 30_000   # empty objects in one list before an integer to refuse: a 90 KB body
WIDE_LIST = b'[' + b",".join([b"{}"] * WIDE) + b',18446744073709551617]'


@pytest.mark.parametrize("path,body,status", [
    ("/app/k/track", b'{"data":[{"type":"event","name":"wide","id":1,"x":' + WIDE_LIST
     + b"}," + good(2) + b"]}", 200),
    ("/v1/batch", b'{"batch":[{"type":"track","event":"e","userId":"u","properties":{"x":'
     + WIDE_LIST + b"}}]}", 400),
], ids=["nucleus", "segment"])
async def test_a_wide_event_is_walked_in_memory_that_follows_its_depth(
        make_agent: Any, path: str, body: bytes, status: int) -> None:
    """An event is walked for what cannot be kept (an integer beyond 64 bits, here) and
    for its depth (any event holding over 251 objects or arrays). The walk kept a step
    for every node, and pushed a list's items all at once: ~300 bytes a node, 590 MB of
    an `outpost run`'s RSS for one 4 MiB event of `{}`."""
    agent = await make_agent()
    tracemalloc.start()
    try:
        reply = await call(agent.port, path, body, headers={"Authorization": basic("k")})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reply.status == status, reply.body
    assert b"beyond 64 bits" in reply.body or reply.json() == {"reportedIds": [2]}
    # Read, the event takes ~150 bytes a node (4.4 MB); the walk took 5.5 MB more.
    assert peak < 200 * WIDE, peak


@pytest.mark.parametrize("path,wrapped", [("/v1/track", False), ("/v1/batch", True)])
async def test_a_segment_event_too_deep_to_map_is_400_naming_the_field(
        make_agent: Any, fake_nucleus: FakeNucleus, path: str, wrapped: bool) -> None:
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    msg = ('{"type":"track","event":"deep","userId":"u","messageId":"deep",'
           '"context":{"x":' + nest(251) + "}}")
    body = f'{{"batch":[{msg}]}}' if wrapped else msg
    reply = await call(agent.port, path, body, headers={"Authorization": basic("k")})
    assert reply.status == 400, reply.body
    assert "context.x" in reply.body.decode() and "deep" in reply.body.decode()
    assert agent.spool.depth == 0
