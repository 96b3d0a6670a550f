"""Seed details an audit found (issue 12 §5): batch-level times, optional auth on the
MetaRouter routes, id-less Nucleus messages, unparseable dates, Tranthor's timestamp."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType

from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, segment_up, wait_for

NO_KEY = "anonymous"   # documented in docs/operations.md
BATCH_TIME = "2020-03-02T18:29:27.333Z"
BATCH_SENT = "2020-03-02T18:29:53.661Z"


def track(mid: str, **kw: Any) -> dict[str, Any]:
    return {"type": "track", "event": "e", "userId": "u", "messageId": mid, **kw}


# -- batch-level timestamp and sentAt (seed 003: "timestamps injected from the top level") --

@pytest.mark.parametrize("path", ["/v1/batch", "/v1/import"])
async def test_batch_timestamp_is_applied_to_messages_without_one(
        make_agent: Any, fake_segment: FakeSegment, path: str) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    own = "2021-01-01T00:00:00.000Z"
    body = {"batch": [track("m1"), track("m2", timestamp=own),
                      track("m3", originalTimestamp=own)],
            "timestamp": BATCH_TIME, "sentAt": BATCH_SENT}
    reply = await call(agent.port, path, body, headers={"Authorization": basic("k")})
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_segment.events) == 3)
    by_id = {ev["messageId"]: ev for ev in fake_segment.events}
    assert by_id["m1"]["timestamp"] == BATCH_TIME      # injected from the top level
    assert by_id["m2"]["timestamp"] == own             # the message's own wins
    # originalTimestamp is the device's time: the receiver corrects it with sentAt, so
    # the batch's timestamp must not replace that correction.
    assert "timestamp" not in by_id["m3"] and by_id["m3"]["originalTimestamp"] == own
    # sentAt is the time of each request: the agent's own at every send, never the client's.
    for ev in fake_segment.events:
        assert ev["sentAt"] != BATCH_SENT
        assert ev["sentAt"] == fake_segment.requests[-1].body["sentAt"]


# -- seed 003: "Authentication (optional)" -------------------------------------------------

async def test_keyless_requests_are_taken_under_the_documented_key_when_any_key_is_accepted(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment, keys=["*"])])
    assert (await call(agent.port, "/v1/track", {"userId": "u", "event": "e"})).status == 200
    assert (await call(agent.port, "/v1/t", {"userId": "u", "event": "e"})).status == 200
    reply = await call(agent.port, "/v1/batch", {"batch": [track("b1")]})
    assert reply.status == 200, reply.body
    reply = await call(agent.port, "/v1/webhook", track("w1"))
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_segment.events) == 4)
    assert {r.write_key for r in fake_segment.requests} == {NO_KEY}
    assert set(agent.spool.streams) == {NO_KEY}


async def test_keyless_requests_are_still_refused_when_keys_are_listed(make_agent: Any) -> None:
    agent = await make_agent(listen={"accept_keys": ["good"]})
    assert (await call(agent.port, "/v1/track", {"userId": "u", "event": "e"})).status == 401
    assert (await call(agent.port, "/v1/batch", {"batch": [track("b1")]})).status == 401
    assert agent.spool.depth == 0


# -- Nucleus: an id-less message is answered on the websocket as over HTTP ------------------

@pytest.mark.parametrize("events", [
    [{"type": "event", "name": "noid", "sessionId": 1, "machineId": "m"}],
    [{"type": "heartbeat", "machineId": "m"}],
])
async def test_id_less_message_gets_the_same_reply_over_websocket_and_http(
        make_agent: Any, events: list[dict[str, Any]]) -> None:
    agent = await make_agent()
    msg = orjson.dumps({"data": events})
    http = await call(agent.port, "/app/k/track", msg)
    assert http.status == 200 and http.json() == {"reportedIds": []}
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(f"http://127.0.0.1:{agent.port}/app/k/track") as ws:
        await ws.send_str(msg.decode())
        reply = await ws.receive(timeout=5)
    assert reply.type == WSMsgType.TEXT, reply
    assert orjson.loads(reply.data) == {"reportedIds": []}


# -- unparseable dates: refused, naming the field; never forwarded as they are --------------

AUTH = {"Authorization": basic("k")}


@pytest.mark.parametrize("field", ["timestamp", "originalTimestamp", "sentAt"])
async def test_single_call_with_a_date_that_is_not_one_is_400_naming_the_field(
        make_agent: Any, field: str) -> None:
    agent = await make_agent()
    reply = await call(agent.port, "/v1/track", {"userId": "u", "event": "e",
                                                 field: "not a date"}, headers=AUTH)
    assert reply.status == 400, reply.body
    assert f"`{field}`" in reply.json()["Message"]
    assert agent.spool.depth == 0


@pytest.mark.parametrize("field", ["timestamp", "originalTimestamp", "sentAt"])
async def test_batch_message_with_a_bad_date_is_207_naming_the_field(
        make_agent: Any, field: str) -> None:
    agent = await make_agent()
    body = {"batch": [track("good"), track("bad", **{field: "not a date"})]}
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    assert reply.status == 207, reply.body
    (err,) = reply.json()["Errors"]
    assert f"`{field}`" in err["Message"] and "messageId=bad" in err["Details"]
    assert agent.spool.depth == 1


@pytest.mark.parametrize("field", ["timestamp", "sentAt"])
async def test_batch_level_bad_date_refuses_the_batch(make_agent: Any, field: str) -> None:
    agent = await make_agent()
    body = {"batch": [track("m1")], field: "yesterday"}
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    assert reply.status == 400, reply.body
    assert f"`{field}`" in reply.json()["Errors"][0]["Message"]
    assert agent.spool.depth == 0


async def test_tranthor_and_segmentstream_bad_dates_are_400_naming_the_field(
        make_agent: Any) -> None:
    agent = await make_agent()
    reply = await call(agent.port, "/api/public/apps/track",
                       {"messageId": "m", "event": "e", "userId": "u", "timestamp": "soon"},
                       headers={"PublicWriteKey": "k"})
    assert reply.status == 400 and "`timestamp`" in reply.json()["message"]
    hit = {"sentAt": "not a date", "event": {"name": "n", "user": {"userId": "u"}}}
    reply = await call(agent.port, "/track", hit, headers=AUTH)
    assert reply.status == 400 and "`sentAt`" in reply.json()["error"]
    assert agent.spool.depth == 0


async def test_iso_dates_in_their_usual_forms_are_taken_as_sent(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    forms = ["2020-03-02T18:29:27.333Z", "2020-03-02T18:29:27Z", "2020-03-02T18:29:27.333+01:00",
             "2020-03-02T18:29:27.123456789Z", "2020-03-02",
             "2020-03-02T18:29:27.333456+00:00",   # Python's isoformat(), naive or not
             "2020-03-02T18:29:27.333456", "2020-03-02T18:29:27.333+0000",   # old iOS SDKs
             "2020-03-02 18:29:27", "2020-03-02T18:29Z"]   # RFC 3339's space; no seconds
    body = {"batch": [track(f"m{i}", timestamp=ts) for i, ts in enumerate(forms)]}
    assert (await call(agent.port, "/v1/batch", body, headers=AUTH)).status == 200
    await wait_for(lambda: len(fake_segment.events) == len(forms))
    assert [ev["timestamp"] for ev in fake_segment.events] == forms   # never changed


async def test_dates_no_client_writes_and_javascript_cannot_read_are_refused(
        make_agent: Any) -> None:
    """Python's fromisoformat reads more than the forms clients write: any separator, week
    dates, the basic format, offsets with seconds, a decimal comma, an hour alone. Taken,
    they were forwarded as sent, to upstreams (and a Nucleus one's JavaScript Date) that
    cannot read them: each is refused, naming its field, as docs/mapping.md says."""
    agent = await make_agent()
    odd = ["2020-03-02_18:29:27", "2020-W10-1", "20200302", "20200302T182927Z",
           "2020-03-02T18:29:27+01:00:30", "2020-03-02T18:29:27,5Z", "2020-03-02T18",
           "2020-03-02T18:29:27+01"]
    body = {"batch": [track("ok"), *(track(f"m{i}", timestamp=ts) for i, ts in enumerate(odd)),
                      track("orig", originalTimestamp=odd[0])]}
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    assert reply.status == 207, reply.body
    errors = {e["Details"]: e["Message"] for e in reply.json()["Errors"]}
    assert len(errors) == len(odd) + 1, errors
    for i, ts in enumerate(odd):
        message = errors[f"batch[{i + 1}] messageId=m{i}"]
        assert "`timestamp` must be an ISO 8601 date string" in message and ts in message
    assert "`originalTimestamp`" in errors[f"batch[{len(odd) + 1}] messageId=orig"]
    assert agent.spool.depth == 1


async def test_a_date_field_holding_an_object_of_24_members_is_refused_naming_it(
        make_agent: Any) -> None:
    """The inline check for JavaScript's toISOString form reads a 24-long value's 24th
    item: an object of 24 members is no string, and is refused naming its field."""
    agent = await make_agent()
    stamp = {str(i): i for i in range(24)}
    reply = await call(agent.port, "/v1/track", track("m", timestamp=stamp), headers=AUTH)
    assert reply.status == 400, reply.body
    assert "`timestamp` must be an ISO 8601 date string" in reply.json()["message"]
    assert agent.spool.depth == 0


# -- Tranthor: an event without timestamp gets the time the agent received it ---------------

async def test_tranthor_event_without_timestamp_keeps_the_time_it_was_received(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """The seed: "if not provided, the current server time will be used". Forwarded days
    later, the upstream's time would be the forwarding time, so the agent sets it."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, "/api/public/apps/track",
                       {"messageId": "m", "event": "e", "userId": "u"},
                       headers={"PublicWriteKey": "k"})
    assert reply.status == 204
    await wait_for(lambda: len(fake_segment.events) == 1)
    (ev,) = fake_segment.events
    assert ev["timestamp"] == ev["receivedAt"]
