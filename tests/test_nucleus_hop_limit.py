"""An Outpost forwarding to another Outpost over Nucleus: what the first acknowledges, the
second must be able to take. The receiver takes a Nucleus message of 4 MiB at most (an
HTTP body, or a websocket message it reads whole), and the sender's frame holds more than
the event the app posted: the device facts filled into an init event, the `date` given to an
event without one, the `id` given to an event without one, the frame around it. An event that only fits as the app posted it was
acknowledged, then dead-lettered (nucleus-http: a 413) or resent forever (nucleus-ws)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType

from agent.dialects.nucleus import MAX_MESSAGE
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.segment_helpers import basic, call, nucleus_up, wait_for

FACTS = {"platform": "linux", "osVersion": "6.1", "totalRam": 16, "arch": "x64",
         "language": "en-US", "locale": "en-US"}
DATE = {"date": "2026-01-01T00:00:00.000Z"}


async def chain(make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
                protocol: str) -> Any:
    """Agent A sending to agent B over ``protocol``, B to a Nucleus collector. Returns A."""
    b = await make_agent(spool=tmp_path / "b.db", upstreams=[nucleus_up(fake_nucleus)])
    scheme = "ws" if protocol == "nucleus-ws" else "http"
    return await make_agent(spool=tmp_path / "a.db", upstreams=[{
        "name": "b", "protocol": protocol, "url": f"{scheme}://127.0.0.1:{b.port}",
        "flush_interval_s": 0.05, "timeout_s": 2}])


def filling(event: dict[str, Any]) -> bytes:
    """A message of exactly MAX_MESSAGE bytes holding ``event``, padded in its payload."""
    event = {**event, "payload": {"pad": ""}}
    short = MAX_MESSAGE - len(orjson.dumps({"data": [event]}))
    event["payload"]["pad"] = "x" * short
    body = orjson.dumps({"data": [event]})
    assert len(body) == MAX_MESSAGE
    return body


GROWN = {
    # An init event without its device facts: A fills them in.
    "facts": {"type": "init", "id": "big", "sessionId": 1, "machineId": "m", **DATE},
    # An event without a date: A gives it the time it received it.
    "date": {"type": "init", "id": "big", "sessionId": 1, "machineId": "m", **FACTS},
    # An event without an id: A's uplink gives it its spool seq.
    "no id": {"type": "event", "name": "e", "sessionId": 1, "machineId": "m", **DATE},
    # A usual event without a date, stored as sent (families/nucleus_as_sent.py), the
    # date put at its end: not an init event, which takes the general path.
    "date, as sent": {"type": "event", "name": "e", "id": "big", "sessionId": 1,
                      "machineId": "m"},
}


@pytest.mark.parametrize("protocol", ["nucleus-http", "nucleus-ws"])
@pytest.mark.parametrize("grown", list(GROWN))
async def test_an_event_that_grows_past_the_receivers_limit_is_refused_at_ingest(
        make_agent: Any, fake_nucleus: FakeNucleus, fast_backoff: Any, tmp_path: Path,
        protocol: str, grown: str) -> None:
    a = await chain(make_agent, fake_nucleus, tmp_path, protocol)
    reply = await call(a.port, "/app/k/track", filling(GROWN[grown]))
    if grown == "no id":   # nothing to leave unacknowledged: the message is refused
        assert reply.status == 413, reply.body
        assert "'b'" in reply.json()["error"], reply.body
    else:                  # left out of reportedIds: the module keeps it
        assert reply.status == 200, reply.body
        assert reply.json()["reportedIds"] == []
    assert a.spool.depth == 0 and not await a.spool.dead_letters()
    # Nothing of it went anywhere: a small event after it is the first B delivers.
    small = {"data": [{"type": "event", "name": "after", "id": 7, "sessionId": 1,
                       "machineId": "m"}]}
    assert (await call(a.port, "/app/k/track", orjson.dumps(small))).json() == {
        "reportedIds": [7]}
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    assert fake_nucleus.ids() == [7]


@pytest.mark.parametrize("protocol", ["nucleus-http", "nucleus-ws"])
async def test_the_largest_event_that_does_not_grow_is_delivered_through_both(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path, protocol: str) -> None:
    a = await chain(make_agent, fake_nucleus, tmp_path, protocol)
    event = {"type": "init", "id": "big", "sessionId": 1, "machineId": "m", **FACTS, **DATE}
    reply = await call(a.port, "/app/k/track", filling(event))
    assert reply.status == 200 and reply.json() == {"reportedIds": ["big"]}, reply.body
    await wait_for(lambda: len(fake_nucleus.events) == 1, timeout=30)
    assert fake_nucleus.ids() == ["big"]
    assert not await a.spool.dead_letters()


async def test_a_segment_message_grown_past_it_by_its_batchs_context_is_refused(
        make_agent: Any, fake_nucleus: FakeNucleus, fast_backoff: Any, tmp_path: Path) -> None:
    """A Segment batch's `context` is merged into each message: a message of a few bytes
    as sent, in a batch within its 4 MiB, is stored near 4 MiB, and mapped to Nucleus past
    the receiver's message. Refused alone, as a 413 item naming the limit."""
    a = await chain(make_agent, fake_nucleus, tmp_path, "nucleus-http")
    small = {"type": "track", "event": "e", "userId": "u", "messageId": "small"}
    big = {"batch": [{**small, "messageId": "big"}], "context": {"pad": ""}}
    big["context"]["pad"] = "x" * (MAX_MESSAGE - len(orjson.dumps(big)) - 16)
    reply = await call(a.port, "/v1/batch", orjson.dumps(big), headers={"Authorization": basic("k")})
    assert reply.status == 413, reply.body
    (error,) = reply.json()["Errors"]
    assert "'b'" in error["Message"] and error["Details"] == "batch[0] messageId=big", error
    assert a.spool.depth == 0 and not await a.spool.dead_letters()
    reply = await call(a.port, "/v1/batch", {"batch": [small]}, headers={"Authorization": basic("k")})
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    assert fake_nucleus.events[0]["payload"]["$segment"]["messageId"] == "small"


async def test_a_module_whose_queue_starts_with_a_refused_event_still_gets_its_others_acked(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """A module keeps an event left out of `reportedIds` at the head of its queue and sends
    its whole queue every tick. Once the refused event is near 4 MiB, every later tick's
    message is over 4 MiB and read as it arrives, keeping its first event alone: the refused
    one. Its other events were never stored nor acknowledged, every tick, for good."""
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    # No date: given the receive time, it no longer fits in a message sent on.
    big = orjson.loads(filling({"type": "event", "name": "big", "id": 1, "sessionId": 1,
                                "machineId": "m"}))["data"][0]
    after = {"type": "event", "name": "after", "id": 2, "sessionId": 1, "machineId": "m",
             **DATE}
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(f"http://127.0.0.1:{agent.port}/app/k/track") as ws:
        await ws.send_bytes(orjson.dumps({"data": [big]}))
        reply = await ws.receive(timeout=30)
        assert reply.type == WSMsgType.TEXT, (reply, ws.close_code)
        assert orjson.loads(reply.data) == {"reportedIds": []}
        # The next tick: its whole queue, the refused event first.
        await ws.send_bytes(orjson.dumps({"data": [big, after]}))
        reply = await ws.receive(timeout=30)
        assert reply.type == WSMsgType.TEXT, (reply, ws.close_code)
        assert orjson.loads(reply.data) == {"reportedIds": [2]}
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    assert fake_nucleus.ids() == [2]
    assert not await agent.spool.dead_letters()


async def test_a_refused_event_sharing_its_id_with_an_event_kept_before_it_is_left_out(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """Ids collide: a module's queue may hold an event that is kept and, later, one with the
    same id that is refused as too large for a Nucleus upstream. Read as it arrives (over 4
    MiB), the refused one joined the kept one's id, the two passed 4 MiB, and the message
    was refused whole (closed 1009): the module sent the same queue at every tick, and none
    of its events was ever stored or acknowledged again. Left out as a message of its own
    size leaves it out, the other events are stored and acknowledged; the id the refused
    one shares is acknowledged by the event stored with it, as any message's would be."""
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    big = orjson.loads(filling({"type": "event", "name": "big", "id": 1, "sessionId": 1,
                                "machineId": "m"}))["data"][0]
    data = [{"type": "event", "name": name, "id": i, "sessionId": 1, "machineId": "m", **DATE}
            for i, name in [(1, "small"), (2, "a")]]
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(f"http://127.0.0.1:{agent.port}/app/k/track") as ws:
        await ws.send_bytes(orjson.dumps({"data": [data[0], big, data[1]]}))
        reply = await ws.receive(timeout=30)
        assert reply.type == WSMsgType.TEXT, (reply, ws.close_code)
        assert orjson.loads(reply.data) == {"reportedIds": [1, 2]}
    await wait_for(lambda: len(fake_nucleus.events) == 2)
    assert [ev["name"] for ev in fake_nucleus.events] == ["small", "a"]
    assert not await agent.spool.dead_letters()


@pytest.mark.parametrize("protocol", ["nucleus-http", "nucleus-ws"])
async def test_an_undated_event_sent_over_the_local_websocket_past_the_limit_is_left_out(
        make_agent: Any, fake_nucleus: FakeNucleus, fast_backoff: Any, tmp_path: Path,
        protocol: str) -> None:
    """The same usual event without a date, in a 4 MiB message over the local websocket
    (read as it arrives, each event judged alone): left out of reportedIds, nothing of it
    stored, and the module's next event delivered."""
    a = await chain(make_agent, fake_nucleus, tmp_path, protocol)
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(f"http://127.0.0.1:{a.port}/app/k/track", max_msg_size=0) as ws:
        await ws.send_bytes(filling(GROWN["date, as sent"]))
        reply = await ws.receive(timeout=30)
        assert reply.type == WSMsgType.TEXT, reply
        assert orjson.loads(reply.data) == {"reportedIds": []}
        await ws.send_bytes(orjson.dumps({"data": [
            {"type": "event", "name": "after", "id": 7, "sessionId": 1, "machineId": "m"}]}))
        reply = await ws.receive(timeout=30)
        assert orjson.loads(reply.data) == {"reportedIds": [7]}
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    assert fake_nucleus.ids() == [7]
    assert a.spool.depth == 0 and not await a.spool.dead_letters()
