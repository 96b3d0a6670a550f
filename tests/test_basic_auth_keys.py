"""A key holding ':' cannot be the username of the Basic auth a segment-http upstream is
sent (RFC 7617: the username ends at the first colon), so such a key routed there, with
no `key` of the upstream's own to send instead, is refused at ingest (401, saying why):
accepted, its events reached the upstream under another key, the part before the colon."""

from __future__ import annotations

from typing import Any

import orjson

from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import call, segment_up, wait_for

COLON_KEY = "ab:cd"


def track(mid: str) -> dict[str, Any]:
    return {"type": "track", "event": "Clicked", "userId": "u-1", "messageId": mid}


async def test_a_key_with_a_colon_routed_to_segment_http_is_refused(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    batch = await call(agent.port, "/v1/batch",
                       {"batch": [track("c-1")], "writeKey": COLON_KEY})
    single = await call(agent.port, f"/v1/track?writeKey={COLON_KEY}", track("c-2"))
    capture = await call(agent.port, "/v1/capture", {"batch": [track("c-3")]},
                         headers={"X-Write-Key": COLON_KEY})
    for reply in (batch, single, capture):
        assert reply.status == 401, reply.body
        assert "':'" in reply.body.decode(), reply.body
    assert agent.spool.depth == 0
    # A key without one is taken and sent as it came.
    ok = await call(agent.port, "/v1/batch", {"batch": [track("c-4")], "writeKey": "abcd"})
    assert ok.status == 200, ok.body
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert [r.write_key for r in fake_segment.requests] == ["abcd"]


async def test_a_key_with_a_colon_is_taken_where_the_upstream_sends_its_own_key(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment, key="upstreamKey")])
    reply = await call(agent.port, "/v1/batch", orjson.dumps(
        {"batch": [track("o-1")], "writeKey": COLON_KEY}))
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.requests[0].write_key == "upstreamKey"
