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


@pytest.mark.parametrize("headers", [{}, {"Authorization": ""}])
async def test_no_token_is_401_saying_where_it_goes(make_agent: Any,
                                                   headers: dict[str, str]) -> None:
    """It said "missing or invalid API token: no key given", where the Segment routes say
    where a key goes."""
    agent = await make_agent()
    reply = await call(agent.port, "/track", seed.SEGMENTSTREAM_TRACK, headers=headers)
    assert reply.status == 401
    assert reply.json() == {"error": "missing or invalid API token: no API token given: send "
                            "it as the username of Basic auth (`Authorization: Basic` and "
                            "the base64 of `TOKEN:`)"}
    assert agent.spool.depth == 0


@pytest.mark.parametrize("header,named", [
    ("Bearer abc123", "must be Basic auth"),
    ("Basic !!!", "not base64"),
])
async def test_an_unreadable_authorization_header_is_401_saying_why(
        make_agent: Any, header: str, named: str) -> None:
    """A token sent the wrong way (Bearer, as many APIs take it) is refused saying so, as
    the Segment routes say it, not as if no header had been sent."""
    agent = await make_agent()
    reply = await call(agent.port, "/track", seed.SEGMENTSTREAM_TRACK,
                       headers={"Authorization": header})
    assert reply.status == 401
    error = reply.json()["error"]
    assert named in error and "no key given" not in error, error
    assert agent.spool.depth == 0


def hit(**event: Any) -> dict[str, Any]:
    return {"hitId": "h1", "event": {"name": "n", "user": {"userId": "u"}, **event}}


@pytest.mark.parametrize("body,fragment", [
    (b'{"hitId": "h1", "event": {', "invalid JSON"),
    (hit(padding="x" * 70_000), "too large"),
    ({"hitId": "h1"}, "`event`"),
    ({"hitId": "h1", "event": "Registered"}, "`event`"),
    (hit(user={"firstName": "J"}), "`event.user.userId` or `event.user.anonymousId`"),
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


async def test_top_level_fields_the_hit_replaces_are_kept_in_context_segmentstream(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    # The hit's own fields take their documented places (docs/mapping.md, SegmentStream
    # hits); a top-level value of the app's in one of those places is kept, verbatim, in
    # context.segmentstream, and nothing the app sent is lost.
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    body = {"hitId": "hit-1", "sentAt": "2019-02-21T10:56:10.723Z",
            "timestamp": "2019-02-21T10:50:00.000Z", "userId": "top-user",
            "anonymousId": "top-anon", "properties": {"top": 1}, "messageId": "top-mid",
            "type": "page",
            "event": {"category": "Auth", "name": "", "label": "l",
                      "user": {"userId": "u1", "anonymousId": None, "emailHash": "e",
                               "plan": "pro"}},
            "context": {"ip": "1.2.3.4", "traits": {"plan": "free"}}}
    reply = await call(agent.port, "/track", body, headers=AUTH)
    assert reply.status == 204, reply.body
    await wait_for(lambda: len(fake_segment.events) == 1)
    ev = fake_segment.events[0]
    assert (ev["type"], ev["event"], ev["messageId"]) == ("track", "Auth", "hit-1")
    assert ev["timestamp"] == "2019-02-21T10:56:10.723Z"     # sentAt: this API's event time
    assert (ev["userId"], ev["anonymousId"]) == ("u1", "top-anon")
    assert ev["properties"] == {"category": "Auth", "name": "", "label": "l"}
    assert ev["context"] == {
        "ip": "1.2.3.4", "traits": {"plan": "free", "emailHash": "e"},
        "segmentstream": {"type": "page", "properties": {"top": 1}, "messageId": "top-mid",
                          "userId": "top-user", "timestamp": "2019-02-21T10:50:00.000Z",
                          "traits": {"plan": "pro"}}}


async def test_a_user_object_trait_leaves_the_hits_own_context_trait_as_sent(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    # The hit's own context.traits value wins whole; the user's, another value, is kept
    # in context.segmentstream.traits: neither is merged into the other.
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    body = {"hitId": "h3", "event": {"name": "n", "user": {
                "userId": "u", "address": {"zip": "1", "city": "B"}, "plan": "pro"}},
            "context": {"traits": {"address": {"city": "A"}}}}
    assert (await call(agent.port, "/track", body, headers=AUTH)).status == 204
    await wait_for(lambda: len(fake_segment.events) == 1)
    ev = fake_segment.events[0]
    assert ev["context"] == {
        "traits": {"address": {"city": "A"}, "plan": "pro"},
        "segmentstream": {"traits": {"address": {"zip": "1", "city": "B"}}}}


async def test_a_hit_agreeing_with_its_top_level_fields_sets_nothing_aside(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    body = {"hitId": "h2", "messageId": "h2", "type": "track", "userId": "u",
            "event": {"name": "n", "user": {"userId": "u"}}}
    assert (await call(agent.port, "/track", body, headers=AUTH)).status == 204
    await wait_for(lambda: len(fake_segment.events) == 1)
    ev = fake_segment.events[0]
    assert "context" not in ev and (ev["messageId"], ev["userId"]) == ("h2", "u")
    assert ev["properties"] == {}


async def test_a_hit_with_its_own_context_segmentstream_and_a_clash_is_400(
        make_agent: Any) -> None:
    # No place left to keep the replaced value in: refused, never overwritten.
    agent = await make_agent()
    body = {**hit(), "type": "page", "context": {"segmentstream": {"mine": 1}}}
    reply = await call(agent.port, "/track", body, headers=AUTH)
    assert reply.status == 400 and "context.segmentstream" in reply.json()["error"]
    assert agent.spool.depth == 0
    fine = {**hit(), "context": {"segmentstream": {"mine": 1}}}   # no clash: kept as sent
    assert (await call(agent.port, "/track", fine, headers=AUTH)).status == 204


@pytest.mark.parametrize("hit_id", ["h" * 100, ""], ids=["100-characters", "empty"])
async def test_a_hit_id_segment_cannot_carry_is_refused_naming_hit_id(
        make_agent: Any, hit_id: str) -> None:
    """The hitId becomes the Segment messageId (1 to 99 characters): one that cannot be
    one is refused naming `hitId`, the field the app sent, not `messageId`, which it did
    not."""
    agent = await make_agent()
    reply = await call(agent.port, "/track", {**hit(), "hitId": hit_id}, headers=AUTH)
    assert reply.status == 400
    error = reply.json()["error"]
    assert "`hitId`" in error and "messageId" not in error, error
    assert agent.spool.depth == 0


@pytest.mark.parametrize("user,named", [
    ({"userId": True}, "`event.user.userId` must be a string"),
    ({"userId": {"id": 1}, "anonymousId": "a"}, "`event.user.userId` must be a string"),
    ({"anonymousId": ["a"]}, "`event.user.anonymousId` must be a string"),
    ({"firstName": "J"}, "`event.user.userId` or `event.user.anonymousId` is required"),
    ({"userId": "", "anonymousId": None}, "`event.user.userId` or `event.user.anonymousId` "
                                          "is required"),
], ids=["userId-true", "userId-object", "anonymousId-array", "neither", "empty"])
async def test_a_bad_or_missing_user_id_is_refused_naming_event_user(
        make_agent: Any, user: dict[str, Any], named: str) -> None:
    """The hit's user ids are `event.user.userId` and `event.user.anonymousId`: a 400 about
    them names those, not the top-level `userId` of the Segment message they become, a
    field the hit never had (an app that followed the error put one there)."""
    agent = await make_agent()
    body = {"hitId": "h1", "event": {"name": "n", "user": user}}
    reply = await call(agent.port, "/track", body, headers=AUTH)
    assert reply.status == 400
    assert reply.json() == {"error": named}
    assert agent.spool.depth == 0


async def test_a_null_user_is_taken_as_no_user(make_agent: Any,
                                               fake_segment: FakeSegment) -> None:
    """Optional fields arrive as JSON null (WIRE-NOTES); `event.user: null` beside a
    top-level id was a 400 "`event.user` must be an object", where the same hit without
    `user` is taken; with no id anywhere, the 400 names the ids, as for a hit without it."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    body = {"hitId": "h-null", "userId": "top", "event": {"name": "n", "user": None}}
    reply = await call(agent.port, "/track", body, headers=AUTH)
    assert reply.status == 204, reply.body
    await wait_for(lambda: len(fake_segment.events) == 1)
    ev = fake_segment.events[0]
    assert (ev["userId"], ev["event"], ev["messageId"]) == ("top", "n", "h-null")
    assert "properties" not in ev or "user" not in ev["properties"]
    reply = await call(agent.port, "/track", {"event": {"name": "n", "user": None}},
                       headers=AUTH)
    assert reply.status == 400
    assert reply.json() == {
        "error": "`event.user.userId` or `event.user.anonymousId` is required"}
