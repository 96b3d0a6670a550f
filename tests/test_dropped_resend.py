"""An event the spool dropped undelivered (full, or expired) is not a duplicate when resent.

Dedupe exists so that an event is delivered once within its window. An event dropped by
``when_full = "drop_oldest"`` or by ``max_age_days`` was never delivered: an app's
resend of it is a new chance to deliver it, and is stored, not answered as a resend.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import pytest

from agent.clock import Clock
from agent.spool import dead_live
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_dead_letters import RefusingNucleus
from tests.test_dead_many import outpost_in_thread
from tests.waiting import wait_for

DAY_MS = 86_400_000


def event(i: int, pad: int = 0) -> dict[str, Any]:
    return {"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m",
            "date": "2026-01-01T00:00:00.000Z", "payload": {"pad": os.urandom(pad).hex()}}


async def post(s: aiohttp.ClientSession, port: int, events: list[dict[str, Any]]) -> None:
    async with s.post(f"http://127.0.0.1:{port}/app/app1/track", json={"data": events}) as r:
        assert r.status == 200, await r.text()


async def test_a_resend_of_events_dropped_at_the_cap_is_stored_and_delivered(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    await fake_nucleus.go_down()
    agent = await make_agent(upstreams=[{"name": "up", "protocol": "nucleus-http",
                                         "url": fake_nucleus.http_url,
                                         "flush_interval_s": 0.02, "timeout_s": 2}],
                             storage={"max_size_mb": 1, "when_full": "drop_oldest"})
    async with aiohttp.ClientSession() as s:
        n = 0
        while not agent.spool.counters.get("dropped_full", 0):
            assert n < 5000, "the spool never filled"
            await post(s, agent.port, [event(n + j, pad=750) for j in range(5)])
            n += 5
        dropped = agent.spool.counters["dropped_full"]
        resent = list(range(dropped))
        ingested = agent.spool.counters["ingested"]
        await post(s, agent.port, [event(i) for i in resent])   # (they may push more out)
        assert agent.spool.counters.get("duplicates", 0) == 0
        assert agent.spool.counters["ingested"] == ingested + len(resent)
    await fake_nucleus.come_back()
    agent.forwarding.flush()
    await wait_for(lambda: set(resent) <= set(fake_nucleus.ids()), timeout=20)


async def test_a_resend_of_expired_events_is_stored(make_agent: Any, clock: Clock) -> None:
    """max_age_days below the dedupe window: expired keys would otherwise still dedupe."""
    agent = await make_agent(storage={"max_age_days": 1, "dedupe_window_h": 72})
    async with aiohttp.ClientSession() as s:
        await post(s, agent.port, [event(i) for i in range(3)])
        clock.passed_ms = DAY_MS + 60_000
        await agent.spool.prune()
        assert agent.spool.counters["expired"] == 3 and agent.spool.depth == 0
        await post(s, agent.port, [event(i) for i in range(3)])
    assert agent.spool.counters.get("duplicates", 0) == 0
    assert agent.spool.depth == 3


async def test_a_delivered_events_resend_is_a_duplicate_all_window_when_its_record_expired(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock) -> None:
    """dedupe_window_h (72 h) longer than max_age_days (1): an event delivered while the
    rest of its request waited keeps its key the whole window, across a restart, when
    expiry drops the rest. Its resend two days on, lost its reply, must not go out again."""
    fake_nucleus.ack = lambda ev_id: ev_id == 0   # the others wait, unacknowledged
    up = {"name": "up", "protocol": "nucleus-http", "url": fake_nucleus.http_url,
          "flush_interval_s": 0.02, "batch_max_events": 1}
    storage = {"max_age_days": 1, "dedupe_window_h": 72}
    agent = await make_agent(upstreams=[up], storage=storage)
    async with aiohttp.ClientSession() as s:
        await post(s, agent.port, [event(i) for i in range(3)])   # one record
    # Event 1's send answered without its ack, its key waiting out a backoff: expiry leaves
    # an event in flight, and a look at once after the ack ran into event 1's send.
    state = agent.forwarding.states["up"]
    await wait_for(lambda: agent.spool.counters.get("acked", 0) == 1 and state.parked > 0)
    clock.passed_ms = 2 * DAY_MS
    await agent.spool.prune()
    assert agent.spool.counters["expired"] == 2 and agent.spool.depth == 0
    await agent.stop()
    fake_nucleus.ack = lambda ev_id: True
    agent = await make_agent(upstreams=[up], storage=storage)
    async with aiohttp.ClientSession() as s:
        await post(s, agent.port, [event(0)])   # the app's resend, within the window
        await post(s, agent.port, [event(5)])
    await wait_for(lambda: 5 in fake_nucleus.ids())   # sent after the resend, had it been kept
    assert fake_nucleus.ids().count(0) == 1, fake_nucleus.ids()
    assert agent.spool.counters.get("duplicates", 0) == 1


async def test_delivered_keys_that_drop_oldest_deletes_are_counted_forgotten(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """A request partly delivered, then pushed out by when_full = "drop_oldest": the keys
    of its delivered events leave the file with it, so a restart within the window no
    longer knows them and a resend goes out again. That is the at-least-once a full spool
    allows, but it must be counted in dedupe_forgotten, as the stored keys the cap forgets
    are: it read 0."""
    fake_nucleus.ack = lambda ev_id: ev_id in (0, 1)   # the third waits, unacknowledged
    up = {"name": "up", "protocol": "nucleus-http", "url": fake_nucleus.http_url,
          "flush_interval_s": 0.02, "batch_max_events": 1, "timeout_s": 2}
    agent = await make_agent(upstreams=[up],
                             storage={"max_size_mb": 1, "when_full": "drop_oldest"})
    async with aiohttp.ClientSession() as s:
        await post(s, agent.port, [event(i) for i in range(3)])   # one record
        await wait_for(lambda: agent.spool.counters.get("acked", 0) == 2)
        await fake_nucleus.go_down()
        n = 100
        while not agent.spool.counters.get("dropped_full", 0):
            assert n < 5000, "the spool never filled"
            await post(s, agent.port, [event(n + j, pad=750) for j in range(5)])
            n += 5
    assert agent.spool.counters["dropped_full"] >= 1
    assert agent.spool.counters.get("dedupe_forgotten", 0) == 2


async def test_events_expired_while_in_flight_and_then_acknowledged_are_delivered_once(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock) -> None:
    """max_age_days passes while a batch waits for its ack: the upstream then acknowledges
    it. Delivered, its events are counted acked (not expired as well), and their keys
    dedupe a resend for the window: it went out a second time, and the counts said it
    was both expired and acked by the upstream."""
    fake_nucleus.answering.clear()   # the frame is received, its reply held
    up = {"name": "up", "protocol": "nucleus-ws", "url": fake_nucleus.url,
          "flush_interval_s": 0.02}
    agent = await make_agent(upstreams=[up], storage={"max_age_days": 1, "dedupe_window_h": 72})
    async with aiohttp.ClientSession() as s:
        await post(s, agent.port, [event(i) for i in range(3)])
        await wait_for(lambda: len(fake_nucleus.events) == 3)
        clock.passed_ms = DAY_MS + 60_000
        await agent.spool.prune()
        fake_nucleus.answering.set()
        await wait_for(lambda: agent.spool.depth == 0 and agent.forwarding.states["up"].acked == 3)
        await post(s, agent.port, [event(0)])   # the app's resend, within the window
        await post(s, agent.port, [event(5)])
    await wait_for(lambda: 5 in fake_nucleus.ids() and agent.spool.depth == 0)   # ack saved
    assert fake_nucleus.ids().count(0) == 1, fake_nucleus.ids()
    counters = agent.spool.counters
    assert (counters.get("expired", 0), counters["acked"], counters["duplicates"]) == (0, 4, 1)


async def test_events_in_flight_when_their_send_fails_expire_then(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock, fast_backoff: Any) -> None:
    """Left alone by expiry only while in flight: once the send fails (no answer within
    timeout_s), they are old, and go."""
    fake_nucleus.answering.clear()
    up = {"name": "up", "protocol": "nucleus-ws", "url": fake_nucleus.url,
          "flush_interval_s": 0.02, "timeout_s": 0.2}
    agent = await make_agent(upstreams=[up], storage={"max_age_days": 1})
    async with aiohttp.ClientSession() as s:
        await post(s, agent.port, [event(i) for i in range(3)])
    await wait_for(lambda: len(fake_nucleus.events) == 3)
    clock.passed_ms = DAY_MS + 60_000

    async def expired() -> bool:
        await agent.spool.prune()
        return agent.spool.depth == 0

    await wait_for(expired)
    assert agent.spool.counters["expired"] == 3
    assert agent.forwarding.states["up"].acked == 0
    fake_nucleus.answering.set()


async def test_drop_oldest_leaves_events_in_flight_to_their_ack(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """when_full = "drop_oldest" at the cap while the oldest events wait for their ack:
    acknowledged, they were delivered. They were counted dropped_full as well as acked by
    the upstream (the counts added up to more than came in), and their keys forgotten, so
    the app's resend went out again."""
    fake_nucleus.answering.clear()
    up = {"name": "up", "protocol": "nucleus-ws", "url": fake_nucleus.url,
          "flush_interval_s": 0.02, "max_in_flight": 1}
    agent = await make_agent(upstreams=[up],
                             storage={"max_size_mb": 1, "when_full": "drop_oldest"})
    async with aiohttp.ClientSession() as s:
        await post(s, agent.port, [event(i) for i in range(3)])
        await wait_for(lambda: len(fake_nucleus.events) == 3)
        n = 100
        while not agent.spool.counters.get("dropped_full", 0):
            assert n < 5000, "the spool never filled"
            await post(s, agent.port, [event(n + j, pad=750) for j in range(5)])
            n += 5
        fake_nucleus.answering.set()
        await wait_for(lambda: agent.forwarding.states["up"].acked >= 3)
        await post(s, agent.port, [event(0)])   # the app's resend, within the window
    state = agent.forwarding.states["up"]
    # The upstream's acked counts an ack once its delete is saved, a turn of the loop
    # after the queue reads empty.
    await wait_for(lambda: agent.spool.depth == 0
                   and state.acked == agent.spool.counters.get("acked"), timeout=20)
    counters = agent.spool.counters
    assert fake_nucleus.ids().count(0) == 1
    assert counters["acked"] == state.acked
    assert counters["ingested"] == counters["acked"] + counters["dropped_full"]


async def test_a_resend_stays_a_duplicate_when_an_older_copy_of_it_expires(
        make_agent: Any, clock: Clock) -> None:
    """Event 0 waits queued past dedupe_window_h (20 h), so the app's resend is stored
    anew, as at-least-once allows. When max_age_days then drops the older copy, the
    newer copy still holds the key: a third send within the newer copy's window is a
    duplicate. The agent forgot the key with the older copy and stored it a third time."""
    hour = 3_600_000
    agent = await make_agent(storage={"max_age_days": 1, "dedupe_window_h": 20})
    async with aiohttp.ClientSession() as s:
        await post(s, agent.port, [event(0)])
        clock.passed_ms = 21 * hour
        await agent.spool.prune()   # the index lets the key go: its window ended
        await post(s, agent.port, [event(0)])
        assert agent.spool.depth == 2 and agent.spool.counters.get("duplicates", 0) == 0
        clock.passed_ms = DAY_MS + hour
        await agent.spool.prune()
        assert agent.spool.counters["expired"] == 1 and agent.spool.depth == 1
        await post(s, agent.port, [event(0)])   # 4 h after the second copy
    assert agent.spool.counters.get("duplicates", 0) == 1
    assert agent.spool.depth == 1
    assert agent.spool.counters.get("dedupe_forgotten", 0) == 0


async def test_a_resend_stays_a_duplicate_when_an_older_copy_expires_after_a_restart(
        make_agent: Any, clock: Clock) -> None:
    """Event 0 let go by dedupe_max_keys while queued, so its resend half an hour later
    is stored again; the agent restarts under a higher cap, which loads both copies'
    records into one bucket. When max_age_days drops the older copy, the newer one
    still holds the key: a third send within its window is a duplicate. The rebuilt
    index forgot the key with the older copy and stored it a third time."""
    storage = {"max_age_days": 1, "dedupe_window_h": 72, "dedupe_max_keys": 16}
    agent = await make_agent(storage=storage)
    async with aiohttp.ClientSession() as s:
        await post(s, agent.port, [event(0), event(1)])
        clock.passed_ms = 900_000   # kept when 0 and 1 expire, 15 minutes after them
        await post(s, agent.port, [event(i) for i in range(100, 116)])   # the cap lets 0 go
        clock.passed_ms = 1_800_000
        await post(s, agent.port, [event(0)])
        assert agent.spool.depth == 19 and agent.spool.counters.get("duplicates", 0) == 0
    await agent.stop()
    agent = await make_agent(storage={**storage, "dedupe_max_keys": 1000})
    clock.passed_ms = DAY_MS + 600_000
    await agent.spool.prune()
    assert agent.spool.counters["expired"] == 2 and agent.spool.depth == 17
    async with aiohttp.ClientSession() as s:
        await post(s, agent.port, [event(0)])
    assert agent.spool.counters.get("duplicates", 0) == 1
    assert agent.spool.depth == 17


@pytest.mark.parametrize("restart", ["", "before the retry", "after the retry",
                                     "stopped for the retry"])
async def test_a_retried_letter_dropped_undelivered_leaves_the_key_a_newer_copy_holds(
        make_agent: Any, clock: Clock, restart: str) -> None:
    """Events 0 and 1 are refused for good (dead letters); dedupe_max_keys lets their keys
    go, so the app's resend of event 0 is stored again and delivered. The operator then
    retries the letters while the upstream is down, and max_age_days drops them
    undelivered (they keep their old receipt). The delivered resend still holds its key
    for its own window: a third send is a duplicate. The retry had moved the key to its
    record, and the drop took it from the index: the third send was stored and delivered
    again (a restart knew it: the file still held the delivered copy's key). Restarted
    after the retry, the agent rebuilt the key into the retried record, the newest
    holding it, and forgot it the same way; restarted before it under a higher cap,
    which loads the letters' record (event 1's key) and the resend into one bucket, the
    retry could not tell whose the key was. Stopped, the agent's letters retried by
    `outpost dead retry` on its spool: that retry had no index, stored the key in the
    retried record, and the restarted agent's rebuild made it the holder."""
    up = RefusingNucleus()
    await up.start()
    try:
        upstreams = [{"name": "up", "protocol": "nucleus-http", "url": up.http_url,
                      "flush_interval_s": 0.02, "timeout_s": 2}]
        storage = {"max_age_days": 1, "dedupe_window_h": 72, "dedupe_max_keys": 16}
        agent = await make_agent(upstreams=upstreams, storage=storage)
        async with aiohttp.ClientSession() as s:
            await post(s, agent.port, [event(0), event(1)])
            await wait_for(lambda: agent.spool.dead_count == 2)
            up.refuse = None
            await post(s, agent.port, [event(i) for i in range(100, 116)])  # the cap lets 0 go
            await post(s, agent.port, [event(0)])
            await wait_for(lambda: up.ids().count(0) == 1 and agent.spool.depth == 0)
            await up.go_down()
            if restart == "before the retry":
                await agent.stop()
                agent = await make_agent(upstreams=upstreams,
                                         storage={**storage, "dedupe_max_keys": 1000})
            if restart == "stopped for the retry":
                await agent.stop()
                code, text = await outpost_in_thread("dead", "retry", "--all", "--config",
                                                     agent.config_path)
                assert code == 0 and "re-queued 2 dead letters" in text, text
                assert "no agent running" in text, text
                agent = await make_agent(upstreams=upstreams, storage=storage)
            else:
                async with s.post(f"http://127.0.0.1:{agent.port}/dead/retry",
                                  json={"all": True}) as r:
                    assert r.status == 200 and (await r.json())["retried"] == 2
            await agent.spool.prune()   # marks the retried record received by now
            if restart == "after the retry":
                await agent.stop()
                agent = await make_agent(upstreams=upstreams, storage=storage)
            clock.passed_ms = DAY_MS + 600_000

            async def expired() -> bool:   # not while its send is in flight
                await agent.spool.prune()
                return agent.spool.depth == 0

            await wait_for(expired)
            assert agent.spool.counters["expired"] == 2
            await post(s, agent.port, [event(0)])   # 24 h after the delivered copy
        assert agent.spool.counters.get("duplicates", 0) == 1
        assert agent.spool.depth == 0
    finally:
        await up.stop()


# One retry's letters in one chunk, or a chunk each (a long retry: 2,000 a chunk).
# The two tests below: event 0 refused for good twice (two dead letters, the older one
# received two days earlier by the wall clock), then, once retried, the older one expired.
_TWO_LETTERS_UPSTREAM = {"protocol": "nucleus-http", "flush_interval_s": 0.02, "timeout_s": 2}
_TWO_LETTERS_STORAGE = {"max_age_days": 1, "dedupe_window_h": 72, "dedupe_max_keys": 16}


async def _two_letters_of_event_0(s: aiohttp.ClientSession, agent: Any, up: RefusingNucleus,
                                  clock: Clock, statuses: tuple[int, int]) -> None:
    """Event 0 refused with each of ``statuses``: sent, and sent again once
    dedupe_max_keys let its key go (16 others delivered)."""
    for n, (status, wall_shift) in enumerate(zip(statuses, (0, 2 * DAY_MS))):
        clock.wall_shift_ms = wall_shift
        up.refuse = status
        await post(s, agent.port, [event(0)])
        await wait_for(lambda n=n: agent.spool.dead_count == n + 1)
        up.refuse = None
        others = range(100 + 16 * n, 116 + 16 * n)
        await post(s, agent.port, [event(i) for i in others])   # the cap lets 0 go
        await wait_for(lambda: agent.spool.depth == 0)


async def _older_expired_then_resent(s: aiohttp.ClientSession, agent: Any,
                                     clock: Clock) -> None:
    """The retried older letter expires undelivered (the newer one stays queued), then
    event 0 is sent again: a duplicate, if the newer copy holds its key."""
    await agent.spool.prune()   # marks the retried records received by now
    clock.passed_ms = DAY_MS + 600_000
    clock.wall_shift_ms = DAY_MS   # the newer letter's receipt 10 min ago

    async def expired() -> bool:   # not while its send is in flight
        await agent.spool.prune()
        return agent.spool.depth == 1

    await wait_for(expired)
    assert agent.spool.counters["expired"] == 1
    await post(s, agent.port, [event(0)])
    assert agent.spool.counters.get("duplicates", 0) == 1
    assert agent.spool.depth == 1


@pytest.mark.parametrize("chunk", [dead_live.CHUNK_LETTERS, 1], ids=["one-chunk", "apart"])
async def test_two_letters_of_one_event_retried_together_leave_the_key_with_the_newer(
        make_agent: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Event 0 is refused for good twice: sent, and sent again once dedupe_max_keys let its
    key go (two dead letters). Both are retried at once while the upstream is down; the
    older one (received two days earlier by the wall clock) then expires, undelivered.
    The newer one still queued holds the key: a resend is a duplicate, as a restart
    would also say (the file's newest copy). The index held the key from the older
    record, the first admitted, and forgot it with it: the resend was stored again. So
    too when the retry takes them in chunks apart: the newer letter's chunk found the key
    held by the older one's new record, and left it there."""
    monkeypatch.setattr(dead_live, "CHUNK_LETTERS", chunk)
    up = RefusingNucleus()
    await up.start()
    try:
        agent = await make_agent(upstreams=[{"name": "up", "url": up.http_url,
                                             **_TWO_LETTERS_UPSTREAM}],
                                 storage=_TWO_LETTERS_STORAGE)
        async with aiohttp.ClientSession() as s:
            await _two_letters_of_event_0(s, agent, up, clock, (400, 400))
            await up.go_down()
            async with s.post(f"http://127.0.0.1:{agent.port}/dead/retry",
                              json={"all": True}) as r:
                assert r.status == 200 and (await r.json())["retried"] == 2
            await _older_expired_then_resent(s, agent, clock)
    finally:
        await up.stop()


@pytest.mark.parametrize("order", ["older first", "newer first"])
@pytest.mark.parametrize("how", ["running agent", "stopped agent"])
async def test_two_letters_of_one_event_retried_by_reason_leave_the_key_with_the_newer(
        make_agent: Any, clock: Clock, how: str, order: str) -> None:
    """As above, but the two dead letters of event 0 have reasons of their own (HTTP 400,
    then HTTP 422), and the operator retries them by reason, one command each. The older
    letter's first, the second retry found the key held by the first one's new record,
    newer by id, took that for a copy stored again and left the key there. The older
    record then expired undelivered, the index forgot the key, and a resend was stored
    again while the newer copy was queued. Alike by a running agent's /dead/retry and by
    `outpost dead retry --reason` on a stopped agent's spool."""
    up = RefusingNucleus()
    await up.start()
    try:
        upstreams = [{"name": "up", "url": up.http_url, **_TWO_LETTERS_UPSTREAM}]
        agent = await make_agent(upstreams=upstreams, storage=_TWO_LETTERS_STORAGE)
        async with aiohttp.ClientSession() as s:
            await _two_letters_of_event_0(s, agent, up, clock, (400, 422))
            await up.go_down()
            async with s.get(f"http://127.0.0.1:{agent.port}/dead") as r:
                letters = (await r.json())["entries"]
            reasons = [e["reason"] for e in sorted(letters, key=lambda e: e["id"])]
            assert [r[:8] for r in reasons] == ["HTTP 400", "HTTP 422"], reasons
            if how == "stopped agent":
                await agent.stop()
            for reason in reasons if order == "older first" else reversed(reasons):
                if how == "running agent":
                    async with s.post(f"http://127.0.0.1:{agent.port}/dead/retry",
                                      json={"reason": reason}) as r:
                        assert r.status == 200 and (await r.json())["retried"] == 1
                else:
                    code, text = await outpost_in_thread(
                        "dead", "retry", "--reason", reason, "--config", agent.config_path)
                    assert code == 0 and "re-queued 1 dead letter" in text, text
            if how == "stopped agent":
                agent = await make_agent(upstreams=upstreams, storage=_TWO_LETTERS_STORAGE)
            await _older_expired_then_resent(s, agent, clock)
    finally:
        await up.stop()
