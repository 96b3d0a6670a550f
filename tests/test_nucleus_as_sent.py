"""A Nucleus module's event reaches the upstream as the module sent it: its own bytes (its
spacing, its escapes, its members in their order), with `date` added at its end when it
had none, over HTTP and over the websocket. A message that needs more (an `init` whose
device facts are filled, an event without an id) is stored re-encoded, as before, and
reaches the upstream the same in meaning."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import orjson

from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_e2e_nucleus import upstream
from tests.waiting import wait_for


def event(i: int, **kw: Any) -> dict[str, Any]:
    return {"type": "event", "name": "Café opened", "id": i, "sessionId": "s-1",
            "machineId": "m-1", "date": "2026-01-15T10:20:30.123Z",
            "payload": {"price": 1.50, "tags": ["a", "b"], "none": None, "big": 2**53 + 1},
            **kw}


async def _posted(port: int, body: bytes, over_ws: bool) -> Any:
    url = f"http://127.0.0.1:{port}/app/app1/track"
    async with aiohttp.ClientSession() as s:
        if over_ws:
            async with s.ws_connect(url) as ws:
                await ws.send_str(body.decode())
                return await ws.receive_json(timeout=5)
        async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def test_each_event_is_forwarded_as_sent_with_a_date_added_where_it_had_none(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    undated = event(3)
    del undated["date"]
    # As nucleus-python writes them: json.dumps, its spaces, non-ASCII escaped.
    events = [json.dumps(ev).encode() for ev in (event(1), event(2, name="☃"), undated)]
    assert b"\\u00e9" in events[0] and b'"price": 1.5' in events[0]
    for over_ws in (False, True):
        body = b'{"data": [' + b", ".join(events) + b"]}"
        assert await _posted(agent.port, body, over_ws) == {"reportedIds": [1, 2, 3]}
        await wait_for(lambda: len(fake_nucleus.events) == 3)
        raw = b"".join(fake_nucleus.raw)
        assert events[0] in raw and events[1] in raw
        date = fake_nucleus.events[2]["date"]
        assert events[2][:-1] + b',"date":"' + date.encode() + b'"}' in raw
        await wait_for(lambda: agent.spool.depth == 0)
        fake_nucleus.events.clear()
        fake_nucleus.raw.clear()
        events = [e.replace(b'"s-1"', b'"s-2"') for e in events]   # not resends


async def test_a_message_needing_more_than_a_date_is_delivered_the_same_in_meaning(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    no_id = event(0)
    del no_id["id"]
    sent = [event(1, type="init"), no_id, event(2, date=None)]
    body = json.dumps({"data": sent}).encode()
    assert await _posted(agent.port, body, False) == {"reportedIds": [1, 2]}
    await wait_for(lambda: len(fake_nucleus.events) == 3)
    init, anonymous, nulled = fake_nucleus.events
    assert init["osVersion"] and init["totalRam"]   # facts filled: re-encoded
    assert {k: v for k, v in init.items() if k in sent[0]} == sent[0]
    assert anonymous == {**no_id, "id": anonymous["id"]}   # sent with its seq as id
    assert nulled["date"] and {**nulled, "date": None} == sent[2]
    assert all(json.dumps(ev).encode() not in b"".join(fake_nucleus.raw) for ev in sent)
    assert orjson.loads(fake_nucleus.raw[0])["data"][0]["id"] == 1


async def test_an_integer_past_64_bits_in_a_field_read_for_the_dedupe_key_is_judged(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """An integer outside the 64-bit range where the dedupe key reads it (a `sessionId`,
    an `id`): JavaScript writes 2**64 as 18446744073709552000, a double's value, kept as
    that double; Python's 2**64 + 1, which a double would round, leaves its event out
    alone. The message is answered, as the general path answers it (it was a 500, and a
    websocket dropped, for every resend of the module's queue)."""
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    sent = [json.dumps(e).encode() for e in (event(1), event(2), event(3))]
    sent[0] = sent[0].replace(b'"sessionId": "s-1"', b'"sessionId": 18446744073709552000')
    sent[1] = sent[1].replace(b'"id": 2', b'"id": 18446744073709552000')
    sent[2] = sent[2].replace(b'"machineId": "m-1"', b'"machineId": 18446744073709551617')
    for over_ws in (False, True):
        body = b'{"data": [' + b", ".join(sent) + b"]}"
        # The id echoed as the double it was read as (the digits JavaScript writes for 2**64).
        assert await _posted(agent.port, body, over_ws) == {"reportedIds": [1, 2.0**64]}
        await wait_for(lambda: len(fake_nucleus.events) == 2)
        assert fake_nucleus.events[0]["sessionId"] == 2**64
        assert [e["id"] for e in fake_nucleus.events] == [1, 2**64]
        await wait_for(lambda: agent.spool.depth == 0)
        fake_nucleus.events.clear()
        sent = [e.replace(b'"m-1"', b'"m-2"') for e in sent]   # not resends
