"""A batch's events handed to the spool as columns (families/event.py Columns), held at
the level an app sees: a /v1/batch naming several keys, some refused (401), one too large
for its upstream (413), repeats within it and against an earlier request, a high-lane
message among them; a batch mapped at ingest to the other family (on the parse worker,
past MAP_INLINE_MAX); a Nucleus message of several slices with ids of every type the
seed takes, events without one, high-lane events, with and without a lanes rule; the
live view of a batch holding repeats. Each key's events stored once, in its order."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.families.event import NUCLEUS, SEGMENT
from agent.families.lanes import HIGH, NORMAL
from agent.server.intake import MAP_INLINE_MAX
from agent.spool.writer import SLICE_EVENTS
from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, tail_messages, wait_for
from tests.test_disk import fill_up, rows, small_fs  # noqa: F401  (small_fs: a fixture)


def offline(protocol: str, **kw: Any) -> dict[str, Any]:
    """An upstream nothing listens at: what comes stays queued."""
    return {"name": protocol, "protocol": protocol, "url": f"http://127.0.0.1:{free_port()}",
            "flush_interval_s": 0.05, "timeout_s": 2, **kw}


def track(mid: str, **kw: Any) -> dict[str, Any]:
    return {"type": "track", "event": "e", "userId": "u", "messageId": mid, **kw}


async def rows_of(agent: Any, key: str) -> list[Any]:
    if key not in agent.spool.streams:
        return []
    return list(await agent.spool.fetch(agent.spool.streams[key].id, 0, 100_000))


async def stored(agent: Any, key: str, field: str = "messageId") -> list[tuple[Any, int]]:
    return [(orjson.loads(bytes(r.body))[field], r.lane) for r in await rows_of(agent, key)]


async def test_a_batch_of_several_keys_some_refused_one_too_large_stores_each_once_in_order(
        make_agent: Any) -> None:
    # segment-http: a 32 KB limit an event, active at ingest.
    agent = await make_agent(upstreams=[offline("segment-http")])
    big = {"pad": "x" * 40_000}
    batch = {"batch": [
        track("a0"), track("b0", writeKey="kb"), track("c0", writeKey="ab:cd"),
        track("a-big", properties=big), track("a1"), track("b0", writeKey="kb"),
        track("a0"), track("c1", writeKey="ab:cd"),
        track("a2", event="Application Opened"), track("b1", writeKey="kb")],
        "writeKey": "ka"}   # each message's own writeKey wins (Basic auth would win over all)
    reply = await call(agent.port, "/v1/batch", batch)
    assert reply.status == 207, reply.body
    text = reply.body.decode()
    for place in ("batch[2]", "batch[3]", "batch[7]"):
        assert place in text, text
    for place in ("batch[0]", "batch[1]", "batch[4]", "batch[5]", "batch[6]", "batch[8]",
                  "batch[9]"):
        assert place not in text, text
    want_a = [("a2", HIGH), ("a0", NORMAL), ("a1", NORMAL)]
    want_b = [("b0", NORMAL), ("b1", NORMAL)]
    assert await stored(agent, "ka") == want_a
    assert await stored(agent, "kb") == want_b
    assert "ab:cd" not in agent.spool.streams
    assert agent.spool.counters["duplicates"] == 2
    # The same batch again: the same items refused, every message taken a resend.
    again = await call(agent.port, "/v1/batch", batch)
    assert (again.status, again.json()) == (reply.status, reply.json())
    assert agent.spool.counters["duplicates"] == 2 + 7
    # One of them as a single call: a resend too.
    single = await call(agent.port, "/v1/track", track("a1"),
                        headers={"Authorization": basic("ka")})
    assert single.status == 200, single.body
    assert agent.spool.counters["duplicates"] == 2 + 7 + 1
    assert await stored(agent, "ka") == want_a
    assert await stored(agent, "kb") == want_b


async def test_a_batch_mapped_at_ingest_off_the_loop_stores_each_key_once_in_order(
        make_agent: Any) -> None:
    """Past MAP_INLINE_MAX events naming a key routed to Nucleus: the batch's columns are
    mapped on the parse worker; the other key's events stay Segment events. Repeats within
    the batch and of an earlier request are stored once."""
    agent = await make_agent(upstreams=[offline("nucleus-http", keys=["sk"]),
                                        offline("segment-http")])
    early = {"batch": [track(f"sk-{i}", writeKey="sk", properties={"n": i})
                       for i in range(0, 40, 3)]}
    assert (await call(agent.port, "/v1/batch", early)).status == 200
    n = MAP_INLINE_MAX + 50
    messages = [track(f"sk-{i}", writeKey="sk", properties={"n": i}) if i % 2
                else track(f"ok-{i}", properties={"n": i}) for i in range(n)]
    messages += [messages[i] for i in range(0, 60, 5)]   # repeats of both keys
    reply = await call(agent.port, "/v1/batch", {"batch": messages, "writeKey": "ok"})
    assert reply.status == 200, reply.body
    sk, ok = await rows_of(agent, "sk"), await rows_of(agent, "ok")
    assert {r.family for r in sk} == {NUCLEUS}
    assert {r.family for r in ok} == {SEGMENT}

    def n_of(row: Any) -> int:
        body = orjson.loads(bytes(row.body))
        return int(body["payload"]["n"] if row.family == NUCLEUS else body["properties"]["n"])
    early_ns = list(range(0, 40, 3))
    later = [i for i in range(1, n, 2) if i not in early_ns]
    assert [n_of(r) for r in sk] == early_ns + later
    assert [n_of(r) for r in ok] == list(range(0, n, 2))
    dupes = agent.spool.counters["duplicates"]
    assert dupes == len(messages) - len(later) - len(range(0, n, 2))
    # The whole batch again: all resends, nothing stored twice.
    assert (await call(agent.port, "/v1/batch",
                       {"batch": messages, "writeKey": "ok"})).status == 200
    assert agent.spool.counters["duplicates"] == dupes + len(messages)
    assert len(await rows_of(agent, "sk")) == len(sk)
    assert len(await rows_of(agent, "ok")) == len(ok)


def nucleus_event(i: int) -> dict[str, Any]:
    """Event ``i``: its id an int, a float, a string or none (by i % 4); an init or an
    error now and then (the high lane), a named Purchase (high once a rule names it)."""
    kind = "init" if i % 97 == 0 else "error" if i % 89 == 0 else "event"
    ev: dict[str, Any] = {"type": kind, "name": "Purchase" if i % 13 == 0 else f"e{i}",
                          "sessionId": 5, "machineId": "m", "n": i,
                          "date": "2026-01-01T00:00:00Z"}
    ident: Any = (i, i + 0.5, f"s{i}", None)[i % 4]
    if ident is not None:
        ev["id"] = ident
    return ev


@pytest.mark.parametrize("ruled", [False, True])
async def test_a_nucleus_message_of_several_slices_with_ids_of_every_type_and_lanes(
        make_agent: Any, ruled: bool) -> None:
    rule = {"priority_events": ["Purchase"]} if ruled else {}
    agent = await make_agent(upstreams=[offline("nucleus-http", **rule)])
    url = f"http://127.0.0.1:{agent.port}/app/nk/track"
    many = 2 * SLICE_EVENTS + 300
    events = [nucleus_event(i) for i in range(many)]
    # Repeats: across slices, and of events an earlier message stored.
    data = events + [events[3], events[SLICE_EVENTS - 1], events[SLICE_EVENTS + 2]]
    data.insert(SLICE_EVENTS + 10, events[7])
    early = events[100:140]

    def acks(sent: list[dict[str, Any]]) -> list[Any]:
        return [ev["id"] for ev in sent if "id" in ev]

    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"data": early}) as r:
            assert (r.status, await r.json()) == (200, {"reportedIds": acks(early)})
        for _ in range(2):   # the module's resend of its whole queue
            async with s.post(url, json={"data": data}) as r:
                assert r.status == 200
                assert await r.json() == {"reportedIds": acks(data)}
    rows = await rows_of(agent, "nk")

    def high(ev: dict[str, Any]) -> bool:
        return ev["type"] in ("init", "error") or (ruled and ev["name"] == "Purchase")
    early_ns = list(range(100, 140))
    order = early_ns + [i for i in range(many) if i not in early_ns]
    want = ([(i, HIGH) for i in order if high(events[i])]
            + [(i, NORMAL) for i in order if not high(events[i])])
    assert [(orjson.loads(bytes(r.body))["n"], r.lane) for r in rows] == want
    assert {r.family for r in rows} == {NUCLEUS}
    assert agent.spool.counters["duplicates"] == (len(data) - (many - len(early))) + len(data)


async def test_the_live_view_shows_a_batch_s_events_and_its_resends(make_agent: Any) -> None:
    agent = await make_agent(upstreams=[offline("segment-http")], port=free_port())
    auth = {"Authorization": basic("lv")}
    assert (await call(agent.port, "/v1/batch", {"batch": [track("x0")]},
                       headers=auth)).status == 200
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}/tail") as resp:
        assert b'"watching"' in await resp.content.readline()
        batch = {"batch": [track("x0"), track("x1"), track("x1"), track("x2")]}
        reply = await call(agent.port, "/v1/batch", batch, headers=auth)
        assert reply.status == 200, reply.body
        got = await tail_messages(resp, 5)
    assert [m.get("id") for m in got[:4]] == ["x0", "x1", "x1", "x2"]
    assert got[4].get("kind") == "resent" and got[4].get("count") == 2, got[4]


async def test_requests_in_one_commit_group_repeating_each_other_store_each_event_once(
        make_agent: Any) -> None:
    """Batches and single calls of one key sent together (one commit takes many of them):
    messageIds repeated within a batch, across batches and by single calls."""
    agent = await make_agent(upstreams=[offline("segment-http")])
    pool = [f"g{i}" for i in range(120)]
    batches = [[track(pool[(7 * b + 5 * j) % len(pool)]) for j in range(40)]
               for b in range(12)]
    singles = [track(pool[(11 * s) % len(pool)]) for s in range(12)]
    auth = {"Authorization": basic("cg")}
    replies = await asyncio.gather(
        *(call(agent.port, "/v1/batch", {"batch": b}, headers=auth) for b in batches),
        *(call(agent.port, "/v1/track", t, headers=auth) for t in singles))
    assert [r.status for r in replies] == [200] * len(replies)
    ids = [mid for mid, _ in await stored(agent, "cg")]
    sent = [m["messageId"] for b in batches for m in b] + [t["messageId"] for t in singles]
    assert sorted(ids) == sorted(set(sent))
    assert agent.spool.counters["duplicates"] == len(sent) - len(set(sent))


async def test_a_message_refused_for_a_full_disk_is_stored_whole_and_once_when_sent_again(
        make_agent: Any, small_fs: Path) -> None:  # noqa: F811
    """A Nucleus message of several slices and a batch of several keys, refused for a full
    disk (their commit failed, their keys never joined the dedupe index), then sent again
    once there is room: each stored whole, once; a third time: all resends."""
    agent = await make_agent(spool=small_fs / "spool" / "spool.db",
                             storage={"max_size_mb": 64})
    url = f"http://127.0.0.1:{agent.port}/app/dk/track"
    data = [{"type": "event", "name": f"e{i}", "id": i, "sessionId": 1, "machineId": "m",
             "date": "2026-01-01T00:00:00Z", "pad": os.urandom(100).hex()}
            for i in range(2 * SLICE_EVENTS + 100)]
    data.insert(SLICE_EVENTS + 3, data[5])
    batch = {"batch": [track(f"d{i}", writeKey=("da", "db")[i % 2],
                             properties={"pad": os.urandom(600).hex()}) for i in range(300)]
             + [track("d4", writeKey="da")]}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"data": data[:1]}) as r:
            assert r.status == 200
        await asyncio.to_thread(fill_up, small_fs / "filler")
        async with s.post(url, json={"data": data}) as r:
            assert r.status == 503, await r.text()
        refused = await call(agent.port, "/v1/batch", batch)
        assert refused.status in (429, 503), refused.body
        (small_fs / "filler").unlink()
        for _ in range(2):
            async with s.post(url, json={"data": data}) as r:
                assert r.status == 200
                assert (await r.json())["reportedIds"] == [ev["id"] for ev in data]
            assert (await call(agent.port, "/v1/batch", batch)).status == 200
    assert [orjson.loads(bytes(r.body))["name"] for r in await rows_of(agent, "dk")] == [
        f"e{i}" for i in range(2 * SLICE_EVENTS + 100)]
    assert [mid for mid, _ in await stored(agent, "da")] == [f"d{i}" for i in range(0, 300, 2)]
    assert [mid for mid, _ in await stored(agent, "db")] == [f"d{i}" for i in range(1, 300, 2)]
    # 1 (e0 again) + 1 (e5 repeated) the first time; every event the second.
    assert agent.spool.counters["duplicates"] == 2 + 1 + len(data) + len(batch["batch"])


async def test_a_batch_and_a_message_sent_again_after_a_kill_9_following_their_200_are_stored_once(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        fake_nucleus: FakeNucleus, fake_segment: FakeSegment) -> None:
    """Acknowledged, then the agent killed (-9) before anything was sent, then the app
    sends the same batch (two keys, a repeat) and Nucleus message (several slices) again
    to the restarted agent: the dedupe index read back from the spool takes them as
    resends; each upstream gets each event once, in its key's order."""
    await fake_nucleus.go_down()
    fake_segment.outage = (503, None)
    port = free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[
        {"name": "n", "protocol": "nucleus-http", "url": fake_nucleus.http_url,
         "keys": ["nk"], "flush_interval_s": 0.05, "timeout_s": 2},
        {"name": "s", "protocol": "segment-http", "url": fake_segment.url,
         "flush_interval_s": 0.05, "timeout_s": 2}])
    agent = agent_process(config, port)
    batch = {"batch": [track(f"k{i}", writeKey=("ka", "kb")[i % 3 == 0]) for i in range(50)]
             + [track("k4", writeKey="ka")]}
    data = [nucleus_event(i) | {"id": i} for i in range(SLICE_EVENTS + 50)]
    url = f"http://127.0.0.1:{port}/app/nk/track"
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            await asyncio.to_thread(agent.start)
            reply = await call(port, "/v1/batch", batch)
            assert reply.status == 200, reply.body
            async with s.post(url, json={"data": data}) as r:
                assert r.status == 200
                assert (await r.json())["reportedIds"] == list(range(len(data)))
            await asyncio.to_thread(agent.kill9)
    await asyncio.to_thread(agent.start)
    fake_segment.outage = None
    await fake_nucleus.come_back()
    await wait_for(lambda: len(fake_segment.events) >= 50 and len(fake_nucleus.events) >= len(data))
    by_key: dict[str | None, list[str]] = {}
    for req in fake_segment.accepted():
        by_key.setdefault(req.write_key, []).extend(ev["messageId"] for ev in req.events)
    assert by_key == {"ka": [f"k{i}" for i in range(50) if i % 3],
                      "kb": [f"k{i}" for i in range(50) if i % 3 == 0]}
    high = [ev["n"] for ev in data if ev["type"] in ("init", "error")]
    assert sorted(ev["n"] for ev in fake_nucleus.events) == list(range(len(data)))
    assert [ev["n"] for ev in fake_nucleus.events if ev["n"] in high] == high
    assert [ev["n"] for ev in fake_nucleus.events if ev["n"] not in high] == [
        ev["n"] for ev in data if ev["n"] not in high]
    assert await asyncio.to_thread(agent.terminate) == 0


async def test_a_route_limit_active_refuses_each_too_large_message_and_no_nucleus_event(
        make_agent: Any) -> None:
    """batch_max_bytes small: a /v1/batch refuses each message too large for segment-http
    alone (413 items) and stores the rest once; a Nucleus message (over a websocket,
    several slices, its columns read as Events for the check) to nucleus-http, which
    refuses no event for its size, is acknowledged and stored whole, once."""
    agent = await make_agent(upstreams=[
        offline("nucleus-http", keys=["wk"], batch_max_bytes=2_000),
        offline("segment-http", batch_max_bytes=2_000)])
    data = [nucleus_event(i) | {"id": i} for i in range(SLICE_EVENTS + 40)]
    for i in (3, SLICE_EVENTS + 1, SLICE_EVENTS + 30):
        data[i]["pad"] = "y" * 3_000
    data += [data[SLICE_EVENTS + 1], data[10]]   # repeats
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(f"http://127.0.0.1:{agent.port}/app/wk/track") as ws:
        for _ in range(2):
            await ws.send_str(orjson.dumps({"data": data}).decode())
            reply = orjson.loads((await ws.receive(timeout=20)).data)
            assert reply == {"reportedIds": [ev["id"] for ev in data]}
    rows = await rows_of(agent, "wk")
    assert sorted(orjson.loads(bytes(r.body))["n"] for r in rows) == list(
        range(SLICE_EVENTS + 40))
    batch = {"batch": [track(f"q{i}", properties={"pad": "z" * 3_000} if i in (1, 4) else {})
                       for i in range(6)] + [track("q2"), track("q4")], "writeKey": "qk"}
    reply = await call(agent.port, "/v1/batch", batch)
    assert reply.status == 207, reply.body
    # Refused: the large ones; the small q4 after its large namesake is taken.
    assert [m.get("Details") for m in reply.json()["Errors"]] == [
        "batch[1] messageId=q1", "batch[4] messageId=q4"], reply.body
    assert [mid for mid, _ in await stored(agent, "qk")] == ["q0", "q2", "q3", "q5", "q4"]
    assert agent.spool.counters["duplicates"] == 2 + len(data) + 1


async def test_a_segment_key_routed_to_nucleus_ws_maps_a_batch_with_repeats_once(
        make_agent: Any) -> None:
    """A batch under MAP_INLINE_MAX of one key routed to nucleus-ws: mapped on the loop
    (its columns made a list of Events), repeats within it and resends stored once."""
    agent = await make_agent(upstreams=[offline("nucleus-ws", keys=["sw"]) | {
        "url": f"ws://127.0.0.1:{free_port()}"}])
    messages = [track(f"w{i}", properties={"n": i}) for i in range(30)]
    messages += [messages[2], messages[29]]
    auth = {"Authorization": basic("sw")}
    for _ in range(2):
        reply = await call(agent.port, "/v1/batch", {"batch": messages}, headers=auth)
        assert reply.status == 200, reply.body
    rows = await rows_of(agent, "sw")
    assert {r.family for r in rows} == {NUCLEUS}
    assert [orjson.loads(bytes(r.body))["payload"]["n"] for r in rows] == list(range(30))
    assert agent.spool.counters["duplicates"] == 2 + len(messages)


async def test_a_message_of_several_slices_with_odd_ids_acks_and_stores_what_the_seed_takes(
        make_agent: Any) -> None:
    """Ids of each kind a module may send, in a message of several slices: zero, negative,
    fractional and large numbers, an empty and a longest string, none; two different events
    sharing an id (both taken, both acked); ids the seed refuses (a boolean, an object, an
    array, a string too long) leave their event out, unacknowledged."""
    agent = await make_agent(upstreams=[offline("nucleus-http")])
    odd: list[Any] = [0, -5, 2.5, 1e20, "", "i" * 1024, None, 2**63 - 1, 7, 7]
    refused: list[Any] = [True, {"a": 1}, [1], "j" * 1025]
    data = [nucleus_event(i) | {"id": i, "type": "event"} for i in range(SLICE_EVENTS + 20)]
    for n, ident in enumerate(odd + refused):
        at = 1 + n * (SLICE_EVENTS // 8)
        data.insert(at, {"type": "event", "name": f"odd{n}", "id": ident, "n": -1 - n,
                         "sessionId": 5, "machineId": "m", "date": "2026-01-01T00:00:00Z"})
    data.append(dict(data[1]))   # the same event again, id 0
    url = f"http://127.0.0.1:{agent.port}/app/ik/track"
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(url, json={"data": data}) as r:
                assert r.status == 200
                assert (await r.json())["reportedIds"] == [
                    ev["id"] for ev in data
                    if ev["id"] is not None and ev["n"] > -1 - len(odd)]
    taken = [ev["n"] for ev in data[:-1] if ev["n"] > -1 - len(odd)]
    assert [orjson.loads(bytes(r.body))["n"] for r in await rows_of(agent, "ik")] == taken
    assert agent.spool.counters["duplicates"] == 1 + len(taken) + 1


async def test_basic_auth_wins_over_each_message_s_writekey_in_a_batch(
        make_agent: Any) -> None:
    """Basic auth names the batch's key for every message, whatever writeKey each names:
    the columns hold one key (alike), stored once, in order."""
    agent = await make_agent(upstreams=[offline("segment-http")])
    batch = {"batch": [track(f"b{i}", writeKey=f"x{i % 3}") for i in range(8)] + [track("b2")]}
    reply = await call(agent.port, "/v1/batch", batch, headers={"Authorization": basic("bk")})
    assert reply.status == 200, reply.body
    assert [mid for mid, _ in await stored(agent, "bk")] == [f"b{i}" for i in range(8)]
    assert not {"x0", "x1", "x2"} & set(agent.spool.streams)
    assert agent.spool.counters["duplicates"] == 1


async def test_a_message_and_a_batch_committed_into_a_deleted_spool_are_kept_once(
        make_agent: Any, tmp_path: Path) -> None:
    """The spool file deleted under the agent: the next commit, a Nucleus message of several
    slices (its columns taken in as it was appended) and a batch of two keys with a repeat,
    goes into the file no path names, is found gone, and is kept in the file made at the
    path; each event counted once, as new, and sent again: resends."""
    path = tmp_path / "spool.db"
    agent = await make_agent(upstreams=[offline("nucleus-http", keys=["dn"]),
                                        offline("segment-http")])
    data = [nucleus_event(i) | {"id": i} for i in range(2 * SLICE_EVENTS + 10)]
    data.append(data[SLICE_EVENTS + 4])
    batch = {"batch": [track(f"r{i}", writeKey=("ra", "rb")[i % 2]) for i in range(20)]
             + [track("r3", writeKey="rb")]}
    url = f"http://127.0.0.1:{agent.port}/app/dn/track"
    async with aiohttp.ClientSession() as s:
        assert (await call(agent.port, "/v1/batch", {"batch": [track("r0")],
                                                     "writeKey": "ra"})).status == 200
        path.unlink()
        async with s.post(url, json={"data": data}) as r, \
                s.post(url, json={"data": data}) as again:
            assert (r.status, again.status) == (200, 200)
        assert (await call(agent.port, "/v1/batch", batch)).status == 200
    await agent.stop()
    assert rows(path) == len(data) - 1 + 20, "events answered 200 are not in the spool file"
    counted = {str(k): v for k, v in agent.spool.counters.items()}
    assert (counted.get("ingested"), counted.get("duplicates", 0)) == (
        1 + len(data) - 1 + 19, 1 + len(data) + 2), counted
