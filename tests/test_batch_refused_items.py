"""One message a Tranthor or capture batch cannot take refuses itself alone.

A Tranthor `/api/public/apps/batch` or capture `/v1/capture` batch holding one message
the family rules refuse (a track without `userId`, a type the API lacks) or one too large
was refused whole (400/413), and the Dittofeed SDK drops a batch answered 4xx: one bad
message lost every good one sent with it. Each such message is now an item of a 207 in
its API's shape, naming its place and what is wrong, and the rest is stored; a batch
whose every message is refused keeps its 400/413, storing nothing.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import orjson

from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, segment_up

KEY = "items-secret-key"
TRANTHOR = ("/api/public/apps/batch", {"authorization": KEY})
CAPTURE = ("/v1/capture", {"X-Write-Key": KEY})


def message(i: int, **kw: Any) -> dict[str, Any]:
    """A track both APIs take; ``kw`` replaces fields (None removes one)."""
    out = {"type": "track", "event": "e", "userId": "u", "messageId": f"m{i}", **kw}
    return {k: v for k, v in out.items() if v is not None}


def five(bad: int, **kw: Any) -> dict[str, Any]:
    return {"batch": [message(i, **kw) if i == bad else message(i) for i in range(5)]}


async def stored_ids(agent: Any) -> list[str]:
    if KEY not in agent.spool.streams:
        return []
    rows = await agent.spool.fetch(agent.spool.streams[KEY].id, 0, 100)
    return [orjson.loads(bytes(r.body))["messageId"] for r in rows]


async def test_a_tranthor_message_without_user_id_is_a_207_item(make_agent: Any,
                                                                 caplog: Any) -> None:
    agent = await make_agent()
    reply = await call(agent.port, TRANTHOR[0], five(3, userId=None), headers=TRANTHOR[1])
    assert reply.status == 207, reply.body
    body = reply.json()
    assert body["statusCode"] == 207 and body["error"] == "Multi-Status", body
    assert body["message"] == "1 of 5 messages refused", body
    [item] = body["errors"]
    assert item == {"statusCode": 400, "error": "Bad Request",
                    "message": "batch[3] messageId=m3: `userId` or `anonymousId` is required"}, item
    assert await stored_ids(agent) == ["m0", "m1", "m2", "m4"]
    assert agent.metrics.refused == {("tranthor", 400): 1}
    assert "batch[3]" in caplog.text and KEY not in caplog.text


async def test_a_capture_message_of_an_unknown_type_is_a_207_item(make_agent: Any) -> None:
    agent = await make_agent()
    reply = await call(agent.port, CAPTURE[0], five(1, type="screen"), headers=CAPTURE[1])
    assert reply.status == 207, reply.body
    body = reply.json()
    assert body["status"] == "partial" and body["message"] == "1 of 5 messages refused", body
    [item] = body["errors"]
    assert item["status"] == "error", item
    assert item["message"].startswith("batch[1] messageId=m1: `type` must be one of"), item
    assert await stored_ids(agent) == ["m0", "m2", "m3", "m4"]
    assert agent.metrics.refused == {("capture", 400): 1}


async def test_several_bad_messages_are_each_an_item_in_order(make_agent: Any) -> None:
    agent = await make_agent()
    batch = {"batch": [message(0), message(1, event=None), message(2),
                       message(3, messageId=None)]}
    reply = await call(agent.port, TRANTHOR[0], batch, headers=TRANTHOR[1])
    assert reply.status == 207, reply.body
    assert [e["message"] for e in reply.json()["errors"]] == [
        "batch[1] messageId=m1: track needs `event` (a non-empty string)",
        "batch[3]: `messageId` is required"]
    assert await stored_ids(agent) == ["m0", "m2"]


async def test_a_tranthor_message_too_large_for_its_upstream_is_a_413_item(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """Routed to `segment-http`, which carries 32 KB per event."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    big = [{"type": "Base64Encoded", "name": "a.png", "mimeType": "image/png",
            "data": base64.b64encode(os.urandom(30_000)).decode()}]
    reply = await call(agent.port, TRANTHOR[0], five(2, files=big), headers=TRANTHOR[1])
    assert reply.status == 207, reply.body
    [item] = reply.json()["errors"]
    assert item["statusCode"] == 413 and item["error"] == "Request Entity Too Large", item
    assert item["message"].startswith("batch[2] messageId=m2: ") and str(32 * 1024) in item["message"]
    assert await stored_ids(agent) == ["m0", "m1", "m3", "m4"]
    assert agent.metrics.refused == {("tranthor", 413): 1}


async def test_a_capture_message_over_32_kb_is_an_item(make_agent: Any) -> None:
    agent = await make_agent()
    reply = await call(agent.port, CAPTURE[0], five(4, properties={"x": "y" * 33_000}),
                       headers=CAPTURE[1])
    assert reply.status == 207, reply.body
    [item] = reply.json()["errors"]
    assert item["status"] == "error" and item["message"].startswith("batch[4] messageId=m4: "), item
    assert "bytes" in item["message"], item
    assert await stored_ids(agent) == ["m0", "m1", "m2", "m3"]
    assert agent.metrics.refused == {("capture", 413): 1}


async def test_a_batch_of_only_bad_messages_is_still_refused_whole(make_agent: Any) -> None:
    agent = await make_agent()
    batch = {"batch": [message(0, userId=None), message(1, event=None)]}
    for route, headers in (TRANTHOR, CAPTURE):
        reply = await call(agent.port, route, batch, headers=headers)
        assert reply.status == 400, (route, reply.body)
        assert "batch[0] messageId=m0: `userId`" in reply.json()["message"], reply.body
        assert "(and 1 more)" in reply.json()["message"], reply.body
    assert agent.spool.depth == 0


async def test_a_batch_of_only_oversize_messages_is_still_413(make_agent: Any) -> None:
    agent = await make_agent()
    batch = {"batch": [message(0, properties={"x": "y" * 33_000})]}
    reply = await call(agent.port, CAPTURE[0], batch, headers=CAPTURE[1])
    assert reply.status == 413, reply.body
    assert reply.json()["message"].startswith("batch[0] messageId=m0: "), reply.body
    assert agent.spool.depth == 0


async def test_a_single_tranthor_call_keeps_its_400(make_agent: Any) -> None:
    agent = await make_agent()
    reply = await call(agent.port, "/api/public/apps/track", message(0, userId=None),
                       headers=TRANTHOR[1])
    assert reply.status == 400, reply.body
    assert reply.json()["message"] == "`userId` or `anonymousId` is required"
    assert agent.spool.depth == 0


async def test_a_batch_refused_for_mixed_reasons_is_400_as_on_v1_batch(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """Every message refused, for different reasons: the status is their common one,
    else 400, on all three batch APIs (it was the first message's on Tranthor and capture:
    413 here, where `/v1/batch` answers 400)."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    big = {"x": "y" * 33_000}   # over 32 KB: the message limit, and segment-http's
    segment = ("/v1/batch", {"Authorization": basic(KEY)})
    for batch, status in (([message(0, properties=big), message(1, userId=None)], 400),
                          ([message(0, userId=None), message(1, properties=big)], 400),
                          ([message(0, properties=big), message(1, properties=big)], 413)):
        for route, headers in (segment, TRANTHOR, CAPTURE):
            reply = await call(agent.port, route, {"batch": batch}, headers=headers)
            assert reply.status == status, (route, batch[0].keys(), reply.body)
    assert agent.spool.depth == 0
