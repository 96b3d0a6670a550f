"""SegmentStream `/track`: the seed's example, hitId dedupe, and its 401/400 errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests import seed_examples as seed
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, fill_spool, segment_up, wait_for

AUTH = {"Authorization": seed.SEGMENTSTREAM_AUTH}


async def test_seed_example_as_written(make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, "/track", seed.SEGMENTSTREAM_TRACK, headers=AUTH)
    assert reply.status == 204 and reply.body == b""
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.requests[0].write_key == "abc123"
    ev = fake_segment.events[0]
    hit = json.loads(seed.SEGMENTSTREAM_TRACK)
    assert ev["type"] == "track" and ev["event"] == "Registered"
    assert ev["messageId"] == hit["hitId"]
    assert ev["timestamp"] == hit["sentAt"]       # this API's sentAt is the hit's time
    assert ev["userId"] == "u2783187492"
    assert ev["anonymousId"] == "80ddb140-35c6-11e9-bd56-eb1c05e6de18"
    assert ev["properties"] == {"category": "Auth", "label": "some label",
                                "nonInteraction": False}
    assert ev["context"] == {"ip": "123.22.334.55", "traits": {
        "emailHash": hit["event"]["user"]["emailHash"], "firstName": "John", "lastName": "Doe"}}


async def test_hit_id_dedupes_resends(make_agent: Any) -> None:
    agent = await make_agent()
    for _ in range(3):
        assert (await call(agent.port, "/track", seed.SEGMENTSTREAM_TRACK,
                           headers=AUTH)).status == 204
    assert agent.spool.depth == 1 and agent.spool.counters["duplicates"] == 2


@pytest.mark.parametrize("headers", [{"Authorization": basic("wrong")}, {},
                                     {"Authorization": "Bearer abc123"}])
async def test_bad_token_is_401(make_agent: Any, headers: dict[str, str]) -> None:
    agent = await make_agent(listen={"accept_keys": ["abc123"]})
    reply = await call(agent.port, "/track", seed.SEGMENTSTREAM_TRACK, headers=headers)
    assert reply.status == 401 and "token" in reply.json()["error"]


def hit(**event: Any) -> dict[str, Any]:
    return {"hitId": "h1", "event": {"name": "n", "user": {"userId": "u"}, **event}}


@pytest.mark.parametrize("body,fragment", [
    (b'{"hitId": "h1", "event": {', "invalid JSON"),
    (hit(padding="x" * 70_000), "too large"),
    ({"hitId": "h1"}, "`event`"),
    ({"hitId": "h1", "event": "Registered"}, "`event`"),
    (hit(user={"firstName": "J"}), "`userId` or `anonymousId`"),
    (hit(user="u"), "`event.user`"),
    (hit(name=None, category=None), "`event.name`"),
    ({**hit(), "hitId": 42}, "`hitId`"),
    ({**hit(), "context": "ip"}, "`context`"),
])
async def test_client_mistakes_are_400(make_agent: Any, body: Any, fragment: str) -> None:
    agent = await make_agent()
    reply = await call(agent.port, "/track", body, headers=AUTH)
    assert reply.status == 400
    assert fragment in reply.json()["error"]
    assert agent.spool.depth == 0


async def test_full_spool_is_503_with_retry_after(make_agent: Any) -> None:
    agent = await make_agent(storage={"max_size_mb": 1})
    await fill_spool(agent.port)
    reply = await call(agent.port, "/track", hit(), headers=AUTH)
    assert reply.status == 503 and int(reply.headers["Retry-After"]) > 0
