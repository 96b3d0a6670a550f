"""A batch's events as the spool keeps them: a message repeated within one batch is
stored once, in the place of its first copy; a bad message is an item of a 207 and the
rest stored in order; a batch naming several keys keeps each key's order; a Nucleus
message repeating an event acks it twice and stores it once; a single call sent again
in a batch is a resend, whatever its id or key."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from agent.spool.writer import SLICE_EVENTS
from tests.segment_helpers import basic, call

KEY = "repeats-key"


def message(mid: str, **kw: Any) -> dict[str, Any]:
    out = {"type": "track", "event": "e", "userId": "u", "messageId": mid, **kw}
    return {k: v for k, v in out.items() if v is not None}


async def stored(agent: Any, key: str, field: str = "messageId") -> list[Any]:
    if key not in agent.spool.streams:
        return []
    rows = await agent.spool.fetch(agent.spool.streams[key].id, 0, 100)
    return [orjson.loads(bytes(r.body))[field] for r in rows]


async def test_a_repeat_within_a_batch_is_stored_once_and_a_bad_message_is_a_207_item(
        make_agent: Any) -> None:
    agent = await make_agent()   # no upstream: the events stay queued
    batch = {"batch": [message("m0"), message("m1"), message("m1"),
                       message("bad", userId=None), message("m2")]}
    reply = await call(agent.port, "/v1/batch", batch, headers={"Authorization": basic(KEY)})
    assert reply.status == 207, reply.body
    assert b"batch[3] messageId=bad" in reply.body
    assert await stored(agent, KEY) == ["m0", "m1", "m2"]
    assert agent.spool.counters["duplicates"] == 1
    # The whole batch again: every message a resend, nothing stored twice.
    reply = await call(agent.port, "/v1/batch", batch, headers={"Authorization": basic(KEY)})
    assert reply.status == 207, reply.body
    assert await stored(agent, KEY) == ["m0", "m1", "m2"]
    assert agent.spool.counters["duplicates"] == 5


async def test_a_batch_naming_two_keys_keeps_each_key_s_order(make_agent: Any) -> None:
    agent = await make_agent()
    batch = {"batch": [message("a0", writeKey="ka"), message("b0", writeKey="kb"),
                       message("a1", writeKey="ka"), message("a0", writeKey="ka"),
                       message("b1", writeKey="kb"), message("a2", writeKey="ka")]}
    reply = await call(agent.port, "/v1/batch", batch)
    assert reply.status == 200, reply.body
    assert await stored(agent, "ka") == ["a0", "a1", "a2"]
    assert await stored(agent, "kb") == ["b0", "b1"]
    assert agent.spool.counters["duplicates"] == 1


# Ids a dedupe key must hash exactly as sent: JSON escapes, non-ASCII, control
# characters, and the longest id taken (its key longer than one block of the hash).
AWKWARD_IDS = ['q"uote', "back\\slash", "caf\u00e9 \U0001f600", "tab\tnl\n\x01", "/sl/ash",
               "m" * 99, '\\"' * 33]
LONG_KEY = "k" * 60 + '"\\\u00e9'


async def test_a_single_call_sent_again_in_a_batch_is_a_resend_whatever_its_id_or_key(
        make_agent: Any) -> None:
    # A single call's dedupe key is pinned (test_dedupe.py); a batch's must be the same,
    # for the key the request names (Basic auth) and for each message's own writeKey.
    agent = await make_agent()
    for mid in AWKWARD_IDS:
        for key in (KEY, LONG_KEY):
            reply = await call(agent.port, "/v1/track", message(mid, writeKey=key))
            assert reply.status == 200, reply.body
    assert agent.spool.counters.get("duplicates", 0) == 0
    named = {"batch": [message(mid) for mid in AWKWARD_IDS]}
    reply = await call(agent.port, "/v1/batch", named, headers={"Authorization": basic(KEY)})
    assert reply.status == 200, reply.body
    own = {"batch": [message(mid, writeKey=key) for mid in AWKWARD_IDS
                     for key in (KEY, LONG_KEY)] + [message("new", writeKey=LONG_KEY)]}
    reply = await call(agent.port, "/v1/batch", own)
    assert reply.status == 200, reply.body
    assert agent.spool.counters["duplicates"] == 3 * len(AWKWARD_IDS)
    assert await stored(agent, KEY) == AWKWARD_IDS
    assert await stored(agent, LONG_KEY) == [*AWKWARD_IDS, "new"]


async def test_a_nucleus_message_repeating_an_event_acks_it_twice_and_stores_it_once(
        make_agent: Any) -> None:
    agent = await make_agent()

    def event(i: int, name: str) -> dict[str, Any]:
        return {"type": "event", "name": name, "id": i, "sessionId": 5, "machineId": "m",
                "date": "2026-01-01T00:00:00Z"}
    data = [event(1, "a"), event(2, "b"), event(1, "a"), event(3, "c")]
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{agent.port}/app/nk/track"
        async with s.post(url, json={"data": data}) as r:
            assert r.status == 200
            assert await r.json() == {"reportedIds": [1, 2, 1, 3]}
    assert await stored(agent, "nk", "name") == ["a", "b", "c"]
    assert agent.spool.counters["duplicates"] == 1


async def test_a_message_of_several_slices_repeating_an_event_across_them_stores_it_once(
        make_agent: Any) -> None:
    """Taken in a slice at a time (spool/writer.py SLICE_EVENTS): a repeat in a later slice
    of an event of the first is stored once, in its first place; the message again is all
    resends."""
    agent = await make_agent()
    many = 2 * SLICE_EVENTS + 5
    names = [f"e{i}" for i in range(many)]
    names.insert(SLICE_EVENTS + 7, "e3")
    data = [{"type": "event", "name": name, "id": i, "sessionId": 5, "machineId": "m",
             "date": "2026-01-01T00:00:00Z"} for i, name in enumerate(names)]
    # The repeat is the same event: its id as the first copy's.
    data[SLICE_EVENTS + 7]["id"] = 3
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{agent.port}/app/big/track"
        for _ in range(2):
            async with s.post(url, json={"data": data}) as r:
                assert r.status == 200
                assert len((await r.json())["reportedIds"]) == many + 1
    rows = await agent.spool.fetch(agent.spool.streams["big"].id, 0, 2 * many)
    assert [orjson.loads(bytes(r.body))["name"] for r in rows] == [f"e{i}" for i in range(many)]
    assert agent.spool.counters["duplicates"] == 1 + many + 1
