"""A `/v1/batch` message reaches the upstream as the app sent it: its own bytes (its
spacing, its escapes, its members in their order), with what the API sets added at its
end (`messageId` and `timestamp` where it had none, then `receivedAt`), and `sentAt` put
first at each send. A batch that needs more than that (a batch-level `context` merged in,
a `writeKey` or `sentAt` in a message dropped, a body written over several lines) is
stored re-encoded, as before, and reaches the upstream the same in meaning."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, segment_up, wait_for

SENT_AT = "2026-01-15T10:20:31.000Z"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def track(mid: str | None, **kw: Any) -> dict[str, Any]:
    message = {"type": "track", "event": "Café Opened", "userId": "u-1",
               "timestamp": "2026-01-15T10:20:30.123Z",
               "properties": {"price": 1.50, "count": 3, "tags": ["a", "b"], "none": None},
               "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
               "integrations": {}, **kw}
    if mid is not None:
        message["messageId"] = mid
    return message


def python_sdk_body(messages: list[bytes]) -> bytes:
    """A batch as analytics-python writes it: json.dumps, its spaces, non-ASCII escaped."""
    return b'{"batch": [' + b", ".join(messages) + b'], "sentAt": "' + SENT_AT.encode() + b'"}'


async def delivered(make_agent: Any, fake: FakeSegment, body: bytes, n: int) -> bytes:
    agent = await make_agent(upstreams=[segment_up(fake)])
    reply = await call(agent.port, "/v1/batch", body,
                       headers={"Authorization": basic("appkey")})
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake.events) == n)
    assert len(fake.requests) == 1
    return fake.requests[0].raw


async def test_each_message_is_forwarded_as_sent_with_received_at_added(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    messages = [json.dumps(track(f"m-{i}", **({"name": "Ünïcode \u2603"} if i else {})))
                .encode() for i in range(3)]
    assert b"\\u00e9" in messages[0] and b'"price": 1.5' in messages[0]
    raw = await delivered(make_agent, fake_segment, python_sdk_body(messages), 3)
    sent = orjson.loads(raw)
    stamp, received = sent["sentAt"], sent["batch"][0]["receivedAt"]
    expected = b'{"batch":[' + b",".join(
        b'{"sentAt":"' + stamp.encode() + b'",' + m[1:-1]
        + b',"receivedAt":"' + received.encode() + b'"}' for m in messages) \
        + b'],"sentAt":"' + stamp.encode() + b'"}'
    assert raw == expected


async def test_what_the_api_sets_is_added_after_the_message_as_sent(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    as_sent = track(None)
    del as_sent["timestamp"]
    message = json.dumps(as_sent).encode()
    raw = await delivered(make_agent, fake_segment, python_sdk_body([message]), 1)
    event = fake_segment.events[0]
    assert UUID.fullmatch(event["messageId"]), event
    assert event["timestamp"] == event["receivedAt"]
    assert raw.endswith(b"," + message[1:-1] + b',"messageId":"' + event["messageId"].encode()
                        + b'","timestamp":"' + event["timestamp"].encode()
                        + b'","receivedAt":"' + event["receivedAt"].encode() + b'"}],"sentAt":"'
                        + orjson.loads(raw)["sentAt"].encode() + b'"}')


async def test_a_batch_needing_more_than_additions_is_delivered_the_same_in_meaning(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """Over several lines, with a batch-level context and a message's own writeKey and
    sentAt: merged and dropped as before, and no forwarded message spans lines."""
    body = json.dumps({"batch": [track("p-1", writeKey="appkey", sentAt=SENT_AT),
                                 track("p-2")],
                       "context": {"app": {"name": "till"}}, "sentAt": SENT_AT},
                      indent=2).encode()
    raw = await delivered(make_agent, fake_segment, body, 2)
    assert b"\n" not in raw
    for event, mid in zip(fake_segment.events, ("p-1", "p-2"), strict=True):
        assert event["messageId"] == mid
        assert "writeKey" not in event
        assert event["context"] == {"app": {"name": "till"},
                                    "library": {"name": "analytics-python", "version": "2.4.0"}}
        assert event["properties"] == track(mid)["properties"]
