"""The old Nucleus modules' `event` key: the name is the name, heartbeats are heartbeats.

Before `type` and `name`, modules sent one key, `event` (the Tracking API's own example:
`"event": "Clicked"`, "Name of the event"): an app's event name, or one of the module's
reserved values, `init`, `error:<kind>`, `nucleus:userid`, `nucleus:props` and
`nucleus:heartbeat` (electron-nucleus 1-2, nucleus-python 0.3's heartbeat). Such an event
was stored with no name and sent to Segment as `event: "event"`, and a heartbeat was
stored and forwarded as an analytics event to every upstream.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType

from agent.families.mapping import nucleus_to_segment, segment_to_nucleus
from tests.conftest import free_port
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import call, nucleus_up, segment_up, tail_messages, wait_for

# The seed's example event, as written there (`"event": String, // Name of the event`).
SEED = {"event": "Clicked", "id": "e1", "userId": "u", "machineId": "m", "sessionId": 1234,
        "platform": "darwin", "osVersion": "18.2.0", "totalRam": 8, "version": "0.1.0",
        "language": "en-US", "payload": {"button": "buy"}}
HEARTBEAT = {"event": "nucleus:heartbeat", "machineId": "m"}


def old(event: str, ev_id: int, **more: Any) -> dict[str, Any]:
    """An event as electron-nucleus 2 queued it."""
    return {"event": event, "date": "2026-01-01T00:00:00.000Z", "appId": "k", "id": ev_id,
            "userId": None, "machineId": "m", "sessionId": 77, **more}


async def test_the_seed_example_reaches_segment_under_its_name(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, "/app/k/track", {"data": [SEED]})
    assert reply.status == 200 and reply.json() == {"reportedIds": ["e1"]}, reply.body
    await wait_for(lambda: len(fake_segment.events) == 1)
    ev = fake_segment.events[0]
    assert (ev["type"], ev["event"], ev["properties"]) == ("track", "Clicked", {"button": "buy"})
    assert ev["context"]["nucleus"]["event"] == "Clicked"   # the old key itself, kept too


async def test_old_module_events_reach_segment_as_what_they_are(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    data = [old("init", 1, platform="linux", version="1.0.0", language="en"),
            old("PLAYED_TRACK", 2, payload={"track": 9}),
            old("error:uncaughtException", 3, payload={"message": "m", "stack": "s"}),
            old("nucleus:userid", 4, userId="user-7"),
            old("nucleus:props", 5, payload={"plan": "pro"})]
    reply = await call(agent.port, "/app/k/track", {"data": data})
    assert reply.json() == {"reportedIds": [1, 2, 3, 4, 5]}, reply.body
    await wait_for(lambda: len(fake_segment.events) == 5)
    got = {ev["context"]["nucleus"]["id"]: ev for ev in fake_segment.events}
    assert got[1]["event"] == "Application Opened"
    assert (got[2]["event"], got[2]["properties"]) == ("PLAYED_TRACK", {"track": 9})
    assert got[3]["event"] == "Application Error"
    assert got[3]["properties"] == {"name": "uncaughtException", "message": "m", "stack": "s"}
    assert (got[4]["type"], got[4]["userId"]) == ("identify", "user-7")
    assert (got[5]["type"], got[5]["traits"]) == ("identify", {"plan": "pro"})


def test_an_old_event_stored_mapped_by_an_earlier_version_is_still_given_back() -> None:
    """Earlier versions stored it mapped with `event: "event"` (the spool outlives an
    upgrade); sent to a Nucleus upstream after all, it is still the event the app sent."""
    ev = {**old("PLAYED_TRACK", 2), "date": 1767225600.5}
    earlier = {**nucleus_to_segment(ev, 1767225600000), "event": "event"}
    assert segment_to_nucleus(earlier, 1767225600001) == ev
    assert segment_to_nucleus({**earlier, "event": "other"}, 1767225600001) != ev


async def test_an_old_event_goes_to_a_nucleus_upstream_as_the_app_sent_it(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    reply = await call(agent.port, "/app/k/track", {"data": [old("PLAYED_TRACK", 2)]})
    assert reply.json() == {"reportedIds": [2]}, reply.body
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    up = fake_nucleus.events[0]
    assert up["event"] == "PLAYED_TRACK" and "type" not in up and "name" not in up


async def test_an_old_heartbeat_is_acknowledged_and_never_stored(
        make_agent: Any, fake_nucleus: FakeNucleus, fake_segment: FakeSegment) -> None:
    """As a current heartbeat: answered `{"reportedIds": []}` (it has no id), not stored,
    forwarded to neither upstream. The event sent after it shows that nothing before it
    is still on its way (one app's events go in order)."""
    agent = await make_agent(upstreams=[
        nucleus_up(fake_nucleus, keys=["nuc"]), segment_up(fake_segment, keys=["*"])])
    for key in ("nuc", "seg"):
        reply = await call(agent.port, f"/app/{key}/track", {"data": [HEARTBEAT]})
        assert reply.status == 200 and reply.json() == {"reportedIds": []}, reply.body
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(f"http://127.0.0.1:{agent.port}/app/{key}/track") as ws:
            await ws.send_str(orjson.dumps({"data": [HEARTBEAT]}).decode())
            answer = await ws.receive(timeout=5)
            assert answer.type == WSMsgType.TEXT, answer
            assert orjson.loads(answer.data) == {"reportedIds": []}
    assert agent.spool.depth == 0
    for key in ("nuc", "seg"):
        reply = await call(agent.port, f"/app/{key}/track", {"data": [HEARTBEAT, old("after", 9)]})
        assert reply.json() == {"reportedIds": [9]}, reply.body
    await wait_for(lambda: len(fake_nucleus.events) == 1 and len(fake_segment.events) == 1)
    assert fake_nucleus.events[0]["event"] == "after" and fake_nucleus.heartbeats == []
    assert [ev["event"] for ev in fake_segment.events] == ["after"]


async def test_the_live_view_shows_the_type_and_name_an_old_event_has(make_agent: Any) -> None:
    agent = await make_agent(port=free_port())
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}/tail") as resp:
        assert b'"watching"' in await resp.content.readline()
        reply = await call(agent.port, "/app/k/track", {"data": [
            old("PLAYED_TRACK", 1), old("error:windowError", 2), old("init", 3)]})
        assert reply.status == 200, reply.body
        got = await tail_messages(resp, 3)
    assert [(m["type"], m["name"], m["warnings"]) for m in got] == [
        ("event", "PLAYED_TRACK", []), ("error", "windowError", []), ("init", None, [])]
