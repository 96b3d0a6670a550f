"""Never accept what cannot be delivered (issue 12 §4): an event larger than its routed
upstream can carry gets its API's own "too large" reply at ingest, naming the limit,
instead of a 2xx and a dead letter."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType

from agent.uplinks.segment_http import SegmentHttpUplink
from tests.conftest import write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import (
    basic,
    call,
    nucleus_up,
    reloaded_while_read,
    segment_up,
    wait_for,
)

APPS = "/api/public/apps"
SEGMENT_LIMIT = str(32 * 1024)


def b64(size: int) -> str:
    return base64.b64encode(os.urandom(size * 3 // 4)).decode()


def nucleus_event(i: int) -> dict[str, Any]:
    return {"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m"}


def tranthor(mid: str, file_bytes: int) -> dict[str, Any]:
    return {"messageId": mid, "event": "Uploaded", "userId": "u",
            "files": [{"type": "Base64Encoded", "name": "a.png", "mimeType": "image/png",
                       "data": b64(file_bytes)}]}


async def test_a_600_kb_tranthor_event_routed_to_segment_http_is_413_naming_the_limit(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, f"{APPS}/track", tranthor("big", 600_000),
                       headers={"PublicWriteKey": "k"})
    assert reply.status == 413, reply.body
    err = reply.json()
    assert err["statusCode"] == 413
    assert SEGMENT_LIMIT in err["message"] and "segment" in err["message"]
    assert agent.spool.depth == 0 and not agent.spool.counters.get("dead_lettered")


async def test_the_same_event_routed_to_nucleus_is_taken_and_delivered(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """The limit is the routed upstream's: Nucleus's (a 4 MiB message) is far above."""
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    reply = await call(agent.port, f"{APPS}/track", tranthor("big", 600_000),
                       headers={"PublicWriteKey": "k"})
    assert reply.status == 204, reply.body
    await wait_for(lambda: len(fake_nucleus.events) == 1)


async def test_routing_is_by_key(make_agent: Any, fake_segment: FakeSegment,
                                 fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment, keys=["web"]),
                                        nucleus_up(fake_nucleus, keys=["*"])])
    body = tranthor("m", 100_000)
    for key, status in (("web", 413), ("desktop", 204)):
        reply = await call(agent.port, f"{APPS}/track", body, headers={"PublicWriteKey": key})
        assert reply.status == status, (key, reply.body)
    assert set(agent.spool.streams) == {"desktop"}


async def test_a_tranthor_batch_holding_one_event_too_large_refuses_it_alone(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    batch = {"batch": [{**tranthor("small", 100), "type": "track"},
                       {**tranthor("big", 40_000), "type": "track"}]}
    reply = await call(agent.port, f"{APPS}/batch", batch, headers={"PublicWriteKey": "k"})
    assert reply.status == 207, reply.body
    [item] = reply.json()["errors"]
    assert item["statusCode"] == 413 and item["message"].startswith("batch[1] messageId=big: ")
    assert SEGMENT_LIMIT in item["message"]
    assert agent.spool.depth == 1


async def test_segmentstream_hit_over_segments_limit_gets_segmentstreams_400(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """SegmentStream takes 64 KB and answers 400 for anything too large (its seed)."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    hit = {"hitId": "h", "event": {"name": "n", "blob": "x" * 40_000,
                                   "user": {"userId": "u"}}}
    reply = await call(agent.port, "/track", hit, headers={"Authorization": basic("k")})
    assert reply.status == 400 and SEGMENT_LIMIT in reply.json()["error"]
    assert agent.spool.depth == 0


async def test_a_segment_batch_message_grown_over_the_limit_by_batch_context_is_a_207_item(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """Each message is under 32 KB as posted; the batch-level context merged into one
    makes it larger than Segment takes."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    body = {"batch": [{"type": "track", "event": "e", "userId": "u", "messageId": "ok"},
                      {"type": "track", "event": "e", "userId": "u", "messageId": "grown",
                       "properties": {"p": "y" * 20_000}}],
            "context": {"c": "z" * 20_000}}
    reply = await call(agent.port, "/v1/batch", body, headers={"Authorization": basic("k")})
    assert reply.status == 207, reply.body
    (err,) = reply.json()["Errors"]
    assert err["Error"] == "Request Entity Too Large" and SEGMENT_LIMIT in err["Message"]
    assert "messageId=grown" in err["Details"]
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.message_ids() == ["ok"]


async def test_an_sdk_batch_message_stored_as_sent_over_segments_limit_is_a_207_item(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """A usual SDK batch (each message with its messageId and timestamp, nothing at the
    batch's level) is stored as sent (families/segment_as_sent.py), which takes messages
    of up to 32 KiB: one a few bytes under that is over what Segment takes once sent
    (its `sentAt` added), and is refused alone, the rest stored."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    base = {"type": "track", "event": "e", "userId": "u", "timestamp": "2020-01-01T00:00:00Z"}
    stored_without_pad = len(orjson.dumps({**base, "messageId": "big", "properties": {"p": ""},
                                           "receivedAt": "2020-01-01T00:00:00.000Z"}))
    pad = 32 * 1024 - 8 - stored_without_pad   # over the limit, under the 32 KiB stored
    body = orjson.dumps({"batch": [{**base, "messageId": "ok"},
                                   {**base, "messageId": "big", "properties": {"p": "x" * pad}}]})
    reply = await call(agent.port, "/v1/batch", body, headers={"Authorization": basic("k")})
    assert reply.status == 207, reply.body
    (err,) = reply.json()["Errors"]
    assert err["Error"] == "Request Entity Too Large" and SEGMENT_LIMIT in err["Message"]
    assert "messageId=big" in err["Details"]
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.message_ids() == ["ok"]
    assert not agent.spool.counters.get("dead_lettered")


async def test_a_nucleus_event_mapped_over_segments_limit_is_left_unacknowledged(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """A module resends its whole unacknowledged queue in every message: refusing the
    message would refuse every later event of the app too. The oversize event alone is
    left out of `reportedIds` (the module keeps it) and the rest is stored and delivered."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    big = {"type": "error", "name": "TypeError", "id": 2, "sessionId": 1, "machineId": "m",
           "payload": {"stack": "x" * 20_000}}   # ~40 KB once mapped to Segment
    queue = [nucleus_event(1), big]
    for i in (3, 4, 5):   # the module's later sends: its unacknowledged queue, and more
        queue.append(nucleus_event(i))
        reply = await call(agent.port, "/app/k/track", orjson.dumps({"data": queue}))
        assert reply.status == 200, reply.body
        reported = reply.json()["reportedIds"]
        assert 2 not in reported and i in reported
        queue = [ev for ev in queue if ev["id"] not in reported]
    assert [ev["id"] for ev in queue] == [2]
    await wait_for(lambda: len(fake_segment.events) == 4)
    assert agent.metrics.refused[("nucleus", 413)] == 3   # each refusal is counted
    assert not agent.spool.counters.get("dead_lettered")


async def test_an_oversize_nucleus_event_without_an_id_refuses_its_message(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """Without an id there is nothing to leave unacknowledged: the message is refused."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    msg = {"data": [{"type": "event", "name": "e", "sessionId": 1, "machineId": "m",
                     "payload": {"p": "x" * 40_000}}]}
    reply = await call(agent.port, "/app/k/track", orjson.dumps(msg))
    assert reply.status == 413 and SEGMENT_LIMIT in reply.json()["error"]
    assert agent.spool.depth == 0


async def test_a_smaller_batch_max_bytes_is_the_limit(make_agent: Any,
                                                      fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment, batch_max_bytes=8192)])
    reply = await call(agent.port, f"{APPS}/track", tranthor("m", 10_000),
                       headers={"PublicWriteKey": "k"})
    assert reply.status == 413 and "batch_max_bytes" in reply.json()["message"]


async def test_the_largest_event_accepted_is_delivered(make_agent: Any,
                                                       fake_segment: FakeSegment) -> None:
    """The limit is exact: one byte under it is delivered, one byte over is refused."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    sent_at_overhead = SegmentHttpUplink.event_overhead - 1
    base = {"messageId": "m", "event": "e", "userId": "u", "timestamp": "2020-01-01T00:00:00Z"}
    stored_without_pad = len(orjson.dumps({**base, "type": "track", "properties": {"p": ""},
                                           "receivedAt": "2020-01-01T00:00:00.000Z"}))
    pad = 32 * 1024 - sent_at_overhead - stored_without_pad
    for mid, size, status in (("f", pad, 204), ("o", pad + 1, 413)):   # ids of one byte
        body = {**base, "messageId": mid, "properties": {"p": "x" * size}}
        reply = await call(agent.port, f"{APPS}/track", body, headers={"PublicWriteKey": "k"})
        assert reply.status == status, (mid, reply.body)
    await wait_for(lambda: len(fake_segment.events) == 1)
    (request,) = fake_segment.requests
    assert len(orjson.dumps(request.body["batch"][0])) == 32 * 1024


async def test_an_event_that_fills_a_smaller_batch_max_bytes_exactly_is_delivered(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """The batch_max_bytes limit is exact too: an event whose batch of one is
    batch_max_bytes long is taken and delivered in a request of that size, and one byte
    more is refused at ingest (the upstream refuses a larger request: 413)."""
    cap = 1024
    fake_segment.max_bytes = cap
    agent = await make_agent(upstreams=[segment_up(fake_segment, batch_max_bytes=cap)])
    stamp = "2020-01-01T00:00:00.000Z"
    base = {"messageId": "m", "event": "e", "userId": "u", "timestamp": "2020-01-01T00:00:00Z"}
    stored_without_pad = len(orjson.dumps({**base, "type": "track", "properties": {"p": ""},
                                           "receivedAt": stamp}))
    # The request of one event: `{"batch":[{"sentAt":"…",<its stored members>}],"sentAt":"…"}`.
    request_without_pad = (len(b'{"batch":[') + len(b'"sentAt":"' + stamp.encode() + b'",')
                           + stored_without_pad + len(b'],"sentAt":"' + stamp.encode() + b'"}'))
    pad = cap - request_without_pad
    for mid, size, status in (("u", pad - 1, 204), ("f", pad, 204), ("o", pad + 1, 413)):
        body = {**base, "messageId": mid, "properties": {"p": "x" * size}}
        reply = await call(agent.port, f"{APPS}/track", body, headers={"PublicWriteKey": "k"})
        assert reply.status == status, (mid, reply.body)
    await wait_for(lambda: agent.spool.depth == 0)   # acknowledged, none dead-lettered
    assert not agent.spool.counters.get("dead_lettered")
    assert sorted(len(r.raw) for r in fake_segment.requests) == [cap - 1, cap]


async def test_a_key_routed_nowhere_yet_is_taken(make_agent: Any,
                                                 fake_segment: FakeSegment) -> None:
    """No upstream can be held against it: it waits for the one a reload may route it to."""
    agent = await make_agent(upstreams=[segment_up(fake_segment, keys=["web"])])
    reply = await call(agent.port, f"{APPS}/track", tranthor("m", 100_000),
                       headers={"PublicWriteKey": "elsewhere"})
    assert reply.status == 204
    assert agent.spool.depth == 1


@pytest.mark.parametrize("to_segment", [True, False])
async def test_a_reload_changes_the_limit_at_once(make_agent: Any, tmp_path: Path,
                                                  fake_segment: FakeSegment,
                                                  fake_nucleus: FakeNucleus,
                                                  to_segment: bool) -> None:
    before, after = nucleus_up(fake_nucleus), segment_up(fake_segment)
    if not to_segment:
        before, after = after, before
    agent = await make_agent(upstreams=[before])
    write_config(Path(agent.config_path), tmp_path / "spool.db", upstreams=[after])
    await agent.reload()
    reply = await call(agent.port, f"{APPS}/track", tranthor("m", 100_000),
                       headers={"PublicWriteKey": "k"})
    assert reply.status == (413 if to_segment else 204), reply.body


async def test_over_the_nucleus_websocket_the_oversize_event_alone_is_left_unacknowledged(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    msg = {"data": [nucleus_event(1), {**nucleus_event(2), "payload": {"p": "x" * 40_000}}]}
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(f"http://127.0.0.1:{agent.port}/app/k/track") as ws:
        await ws.send_bytes(orjson.dumps(msg))
        reply = await ws.receive(timeout=5)
    assert reply.type == WSMsgType.TEXT and orjson.loads(reply.data) == {"reportedIds": [1]}
    await wait_for(lambda: len(fake_segment.events) == 1)


async def test_a_reload_while_a_large_batch_is_read_leaves_it_to_the_routes_it_was_read_by(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """A batch over 64 KB is read on the parse worker, and a reload applies its routes to
    the next request. One landing after the reading but before the commit held the
    commit to the new routes: a message they refuse was a 500 for the whole batch."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    write_config(Path(agent.config_path), agent.spool.path,
                 upstreams=[segment_up(fake_segment, batch_max_bytes=8192)])
    batch = {"batch": [{"type": "track", "event": "e", "userId": "u", "messageId": f"m{i}",
                        "properties": {"p": "x" * 10_000}} for i in range(8)]}
    headers = {"Authorization": basic("k")}
    reply = await reloaded_while_read(
        agent, lambda: call(agent.port, "/v1/batch", batch, headers=headers))
    assert reply.status == 200, reply.body
    assert agent.spool.depth == 8
    again = await call(agent.port, "/v1/batch", batch, headers=headers)   # the next request
    assert again.status == 413 and "batch_max_bytes" in again.json()["Errors"][0]["Message"]
