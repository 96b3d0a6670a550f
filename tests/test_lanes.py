"""Priority lanes (issue 13 §3): events classified once at ingest, stored per lane, sent
high first with FIFO per (key, lane), and ``priority_only`` sending the high lane alone.

Absence (normal events not sent under ``priority_only``) is proved by the gate: with
its high lane empty, the key has no forwarding loop, so nothing can be sent.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.clock import Clock
from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.families.lanes import HIGH, NORMAL
from agent.forwarder.supervisor import Seams
from agent.outcomes import Drop
from agent.settings import StorageConfig
from agent.spool import Spool, dead, dead_live
from agent.sync.monitor import BATTERY_POLL_S
from agent.sync.policy import Battery
from tests.conftest import FAST_BACKOFF
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, segment_up
from tests.waiting import wait_for


def track(i: int, name: str) -> dict[str, Any]:
    return {"type": "track", "event": name, "messageId": f"m{i}", "anonymousId": "a"}


async def test_segment_events_are_classified_at_ingest_and_a_backlog_sends_high_first(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    fake_segment.outage = (503, None)   # a backlog builds up
    agent = await make_agent(seams=Seams(backoff=FAST_BACKOFF), upstreams=[segment_up(
        fake_segment, keys=["k"], priority_types=["identify"],
        priority_events=["Order Completed"])])
    batch = [track(0, "Viewed"), track(1, "Application Opened"),
             {"type": "page", "name": "p", "messageId": "m2", "anonymousId": "a"},
             {"type": "identify", "messageId": "m3", "userId": "u"},
             track(4, "Order Completed"), track(5, "Application Error"), track(6, "Viewed")]
    for key in ("k", "other"):   # "other": no upstream takes it, so no rule applies to it
        reply = await call(agent.port, "/v1/batch", {"batch": batch},
                           headers={"Authorization": basic(key)})
        assert reply.status == 200, reply.body
    other = await agent.spool.fetch(agent.spool.streams["other"].id, 0, 100)
    assert [(orjson.loads(r.body)["messageId"], r.lane) for r in other] == [
        ("m1", HIGH), ("m5", HIGH),
        ("m0", NORMAL), ("m2", NORMAL), ("m3", NORMAL), ("m4", NORMAL), ("m6", NORMAL)]
    assert agent.spool.streams["k"].high == 4 and agent.spool.streams["other"].high == 2
    await wait_for(lambda: len(fake_segment.requests) >= 1)   # tried, refused: queued
    fake_segment.outage = None
    await wait_for(lambda: len(fake_segment.events) >= 7)
    # The rules of k's upstream: identify and "Order Completed" go with the built-in ones.
    assert fake_segment.message_ids() == ["m1", "m3", "m4", "m5", "m0", "m2", "m6"]
    await wait_for(lambda: agent.spool.streams["k"].depth == 0)
    assert agent.spool.streams["k"].high == 0


async def test_nucleus_ws_with_one_frame_in_flight_changes_lanes_without_a_crash(
        make_agent: Any, fake_nucleus: FakeNucleus, caplog: Any) -> None:
    """nucleus-ws with max_in_flight = 1 (a window of one, as HTTP has): the lanes
    change while a frame is in flight, and the rest goes out in order with no crash. (A
    read-ahead, since removed, once prepared a batch meanwhile and dropped it at the
    change with its ids still marked in flight: "took no row", a crash and a restart.)"""
    timing = ManualTiming()
    battery = {"now": Battery(percent=9, plugged=False)}
    agent = await make_agent(
        upstreams=[{"name": "up", "protocol": "nucleus-ws", "url": fake_nucleus.url,
                    "keys": ["app1"], "flush_interval_s": 0.05, "max_in_flight": 1,
                    "batch_max_events": 2}],
        seams=Seams(timing=timing), battery=lambda: battery["now"],
        sync={"on_low_battery": "priority_only", "low_battery_pct": 20})
    fake_nucleus.delay_s = 0.5
    data = [{"type": kind, "name": "e", "id": i, "sessionId": 1, "machineId": "m",
             "date": "2026-01-01T00:00:00.000Z"}
            for i, kind in [(10, "event"), (1, "init"), (2, "error"), (3, "error"), (4, "error")]]
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{agent.port}/app/app1/track", json={"data": data}) as r:
        assert r.status == 200, await r.text()
    await wait_for(lambda: len(fake_nucleus.batches) == 1)   # 1, 2: the high lane alone
    loop = agent.forwarding.loops["app1"]
    battery["now"] = Battery(percent=9, plugged=True)
    await wait_for(lambda: BATTERY_POLL_S in timing.pending())
    timing.advance(BATTERY_POLL_S)
    await wait_for(lambda: loop.lanes == (HIGH, NORMAL))
    await wait_for(lambda: len(fake_nucleus.batches) == 2)   # 3, 4
    await wait_for(lambda: agent.spool.depth == 0)   # 10: received long since, due at once
    assert fake_nucleus.batches == [[1, 2], [3, 4], [10]]
    assert not [r.getMessage() for r in caplog.records if "crashed" in r.getMessage()]


def nucleus(i: int, kind: str, lane: int) -> Event:
    body = {"type": kind, "id": i, "sessionId": 1}
    return Event("k", NUCLEUS, dedupe_key("k", i), orjson.dumps(body), lane=lane)


def ids(rows: list[Any]) -> list[int]:
    return [orjson.loads(r.body)["id"] for r in rows]


async def test_each_lane_is_fifo_across_commits_and_its_depth_is_kept(tmp_path: Path) -> None:
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    try:
        assert await spool.append([nucleus(0, "event", NORMAL), nucleus(1, "init", HIGH),
                                   nucleus(2, "event", NORMAL), nucleus(3, "error", HIGH)]) == 4
        assert await spool.append([nucleus(4, "error", HIGH), nucleus(5, "event", NORMAL)]) == 2
        sid = spool.streams["k"].id
        rows = await spool.fetch(sid, 0, 100)
        assert ids(rows) == [1, 3, 4, 0, 2, 5]   # high first; each lane in its order
        assert ids(await spool.fetch(sid, 0, 100, (NORMAL,))) == [0, 2, 5]
        # One cursor per lane: a read goes on where each lane's last one stopped.
        by_id = {orjson.loads(r.body)["id"]: r.seq for r in rows}
        assert ids(await spool.fetch(sid, [by_id[3], by_id[0]], 100)) == [4, 2, 5]
        assert ids(await spool.fetch(sid, 0, 4)) == [1, 3, 4, 0]
        stream = spool.streams["k"]
        assert (stream.depth, stream.high) == (6, 3)
        await spool.ack([by_id[1], by_id[0]])
        await spool.dead_letter([(by_id[3], "up", "HTTP 400: no")])
        assert (stream.depth, stream.high) == (3, 1)
    finally:
        await spool.close()
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    try:   # counted again from the records at start
        stream = spool.streams["k"]
        assert (stream.depth, stream.high) == (3, 1)
        assert await dead_live.retry(spool, dead.Which(every=True)) == 1
        assert (stream.depth, stream.high) == (4, 2)
        assert ids(await spool.fetch(stream.id, 0, 100)) == [4, 3, 2, 5]   # retried: its lane's tail
    finally:
        await spool.close()


async def test_drop_oldest_drops_the_normal_lane_first(tmp_path: Path) -> None:
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db"), max_size_mb=1,
                                           when_full="drop_oldest"))
    try:
        def pad() -> str:   # incompressible: records are compressed
            return os.urandom(1000).hex()
        high = [Event("k", NUCLEUS, dedupe_key("h", i),
                      orjson.dumps({"type": "error", "id": i, "p": pad()}), lane=HIGH)
                for i in range(20)]
        assert await spool.append(high) == 20
        for n in range(150):   # ~3 MB of normal events into a 1 MB spool
            await spool.append([Event("k", NUCLEUS, dedupe_key("n", n * 10 + j), orjson.dumps(
                {"type": "event", "id": 1000 + n * 10 + j, "p": pad()})) for j in range(10)])
        assert spool.counters[Drop.DROPPED_FULL] > 0
        rows = await spool.fetch(spool.streams["k"].id, 0, 10_000)
        assert ids(rows)[:20] == list(range(20)) and spool.streams["k"].high == 20
        normal = ids(rows)[20:]
        assert normal == list(range(normal[0], 2500))   # the newest, in order
    finally:
        await spool.close()


def nucleus_up(fake: FakeNucleus) -> dict[str, Any]:
    return {"name": "up", "protocol": "nucleus-ws", "url": fake.url, "keys": ["app1"],
            "flush_interval_s": 0.05}


async def post(port: int, events: list[tuple[int, str]]) -> None:
    data = [{"type": kind, "name": "e", "id": i, "sessionId": 1, "machineId": "m",
             "date": "2026-01-01T00:00:00.000Z"} for i, kind in events]
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{port}/app/app1/track", json={"data": data}) as r:
        assert r.status == 200, await r.text()


async def test_priority_only_sends_the_high_lane_alone_until_the_rule_no_longer_applies(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    timing = ManualTiming()
    battery = {"now": Battery(percent=9, plugged=False)}
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)], seams=Seams(timing=timing),
                             battery=lambda: battery["now"],
                             sync={"on_low_battery": "priority_only", "low_battery_pct": 20})
    assert (agent.sync.profile.mode, agent.sync.profile.reason) == ("priority_only", "battery 9%")
    await post(agent.port, [(1, "init"), (2, "event"), (3, "event"), (4, "error"), (5, "event")])
    await wait_for(lambda: [ev["id"] for ev in fake_nucleus.events] == [1, 4])
    stream = agent.spool.streams["app1"]
    await wait_for(lambda: stream.high == 0 and "app1" not in agent.forwarding.loops)
    assert stream.depth == 3   # held, with no loop to send them
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        sync = (await r.json())["sync"]
    assert (sync["profile"], sync["held_events"], sync["held_lanes"]) == \
        ("priority_only", 3, {"high": 0, "normal": 3})
    await post(agent.port, [(6, "event"), (7, "error")])   # high goes, normal waits
    await wait_for(lambda: [ev["id"] for ev in fake_nucleus.events] == [1, 4, 7])
    await wait_for(lambda: "app1" not in agent.forwarding.loops)

    battery["now"] = Battery(percent=9, plugged=True)
    await wait_for(lambda: BATTERY_POLL_S in timing.pending())
    timing.advance(BATTERY_POLL_S)
    await wait_for(lambda: agent.spool.depth == 0)
    assert [ev["id"] for ev in fake_nucleus.events] == [1, 4, 7, 2, 3, 5, 6]


async def test_a_lane_change_during_a_read_sends_nothing_read_under_the_old_lanes(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """The lanes change to priority_only while the forwarder's read waits for the reader
    thread (held here by a call queued ahead of it): the normal event that read took
    under the old lanes must not go out with the high one."""
    timing = ManualTiming()
    battery = {"now": Battery(percent=9, plugged=True)}
    # nucleus-http: no connection to open between the read and the batch; two events are
    # a whole batch, due at once.
    up = {**nucleus_up(fake_nucleus), "protocol": "nucleus-http", "url": fake_nucleus.http_url,
          "batch_max_events": 2}
    agent = await make_agent(upstreams=[up], seams=Seams(timing=timing),
                             battery=lambda: battery["now"],
                             sync={"on_low_battery": "priority_only", "low_battery_pct": 20})
    reader = agent.spool.reader
    assert reader is not None
    release = threading.Event()
    holding = reader.run(lambda conn: release.wait(30))
    try:
        await post(agent.port, [(1, "event"), (2, "init")])
        await wait_for(lambda: reader._calls.qsize() >= 1)   # the forwarder's read, queued
        loop = agent.forwarding.loops["app1"]
        assert loop.lanes == (HIGH, NORMAL)
        battery["now"] = Battery(percent=9, plugged=False)
        await wait_for(lambda: BATTERY_POLL_S in timing.pending())
        timing.advance(BATTERY_POLL_S)
        await wait_for(lambda: loop.lanes == (HIGH,))
    finally:
        release.set()
        await holding
    await wait_for(lambda: agent.spool.streams["app1"].high == 0
                   and "app1" not in agent.forwarding.loops)
    assert [ev["id"] for ev in fake_nucleus.events] == [2]
    assert agent.spool.streams["app1"].depth == 1   # 1, normal: held


# One batch in flight, the next read ahead two batches deep: the rows a high read left are
# not the normal lane's share.
@pytest.mark.parametrize("in_flight", [{}, {"max_in_flight": 1}], ids=["pipelined", "one"])
async def test_a_busy_high_lane_leaves_the_normal_lane_a_share(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock,
        in_flight: dict[str, int]) -> None:
    """An app in an error loop keeps the high lane full: normal events must still go (a
    batch of them after every few high batches), each lane FIFO."""
    timing = ManualTiming()
    battery = {"now": Battery(percent=9, plugged=False)}   # holds while the backlog is posted
    agent = await make_agent(upstreams=[{**nucleus_up(fake_nucleus), "batch_max_events": 5,
                                         **in_flight}],
                             seams=Seams(timing=timing), battery=lambda: battery["now"],
                             sync={"on_low_battery": "hold", "low_battery_pct": 20})
    await post(agent.port, [(i, "event") for i in range(1, 11)])
    await post(agent.port, [(i, "error") for i in range(100, 160)])   # high: 12 batches
    clock.passed_ms += 1000   # every queued event is due
    battery["now"] = Battery(percent=9, plugged=True)
    await wait_for(lambda: BATTERY_POLL_S in timing.pending())
    timing.advance(BATTERY_POLL_S)
    await wait_for(lambda: agent.spool.depth == 0)
    ids = [ev["id"] for ev in fake_nucleus.events]
    normal = [i for i in ids if i < 100]
    assert normal == list(range(1, 11))
    assert [i for i in ids if i >= 100] == list(range(100, 160))
    # After NORMAL_SHARE (4) high batches of 5, never more: a read of several batches
    # passed the share by up to the window (the first normal event 20th to 30th and more).
    assert ids.index(1) == 20, ids


async def test_a_normal_record_partly_sent_before_priority_only_is_left_to_the_cap(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """priority_only comes while a normal batch is in flight; it is answered, the rest of
    its record waits. Nothing of it is in flight any more, yet the loop, sending the high
    lane alone, kept its normal cursor leased: drop_oldest left that record (the key's
    oldest events) and dropped newer events instead, for as long as the loop ran."""
    timing = ManualTiming()
    battery = {"now": Battery(percent=9, plugged=True)}
    # Batches of two go at once (full); the loop, idle, lasts a minute (flush_interval_s).
    up = {**nucleus_up(fake_nucleus), "flush_interval_s": 60, "batch_max_events": 2,
          "max_in_flight": 1}
    agent = await make_agent(upstreams=[up], seams=Seams(timing=timing),
                             battery=lambda: battery["now"],
                             storage={"max_size_mb": 1, "when_full": "drop_oldest"},
                             sync={"on_low_battery": "priority_only", "low_battery_pct": 20})
    fake_nucleus.answering.clear()
    await post(agent.port, [(i, "event") for i in range(5)])   # one record, normal lane
    await wait_for(lambda: fake_nucleus.ids() == [0, 1])
    loop = agent.forwarding.loops["app1"]
    battery["now"] = Battery(percent=9, plugged=False)
    await wait_for(lambda: BATTERY_POLL_S in timing.pending())
    timing.advance(BATTERY_POLL_S)
    await wait_for(lambda: loop.lanes == (HIGH,))
    fake_nucleus.answering.set()
    stream = agent.spool.streams["app1"]
    await wait_for(lambda: stream.depth == 3)        # 0, 1 acked and deleted
    assert agent.forwarding.loops.get("app1") is loop   # still running, the high lane idle
    async with aiohttp.ClientSession() as s:
        n = 0
        while agent.spool.counters.get("dropped_full", 0) < 3:
            assert n < 5000, "the spool never filled"
            data = [{"type": "event", "name": "e", "id": 100 + n + j, "sessionId": 1,
                     "payload": os.urandom(750).hex()} for j in range(5)]
            async with s.post(f"http://127.0.0.1:{agent.port}/app/parked/track",
                              json={"data": data}) as r:
                assert r.status == 200, await r.text()
            n += 5
    assert stream.depth == 0, "the oldest events were left, newer ones dropped"


@contextlib.asynccontextmanager
async def answered_at_last(fake: FakeNucleus) -> AsyncIterator[None]:
    """Replies held inside, let go at the end whatever happened (a failed test's agent
    would otherwise wait out timeout_s at its stop)."""
    fake.answering.clear()
    try:
        yield
    finally:
        fake.answering.set()


def sized(ids: range, kind: str) -> list[dict[str, Any]]:
    """Nucleus events of ``kind`` with ids ``ids``, ~1.5 KB each: a 1 MB spool fills fast."""
    return [{"type": kind, "name": "e", "id": i, "sessionId": 1, "machineId": "m",
             "payload": os.urandom(750).hex()} for i in ids]


async def dropping_oldest(make_agent: Any, fake_nucleus: FakeNucleus, timeout_s: float
                          ) -> tuple[Any, str]:
    """An agent with a 1 MB spool under drop_oldest, one batch in flight at a time to
    ``fake_nucleus`` (waiting ``timeout_s`` for its answer), and the url apps post to."""
    up = {**nucleus_up(fake_nucleus), "flush_interval_s": 0.02, "max_in_flight": 1,
          "timeout_s": timeout_s}
    agent = await make_agent(upstreams=[up],
                             storage={"max_size_mb": 1, "when_full": "drop_oldest"})
    return agent, f"http://127.0.0.1:{agent.port}/app/app1/track"


async def filled_with_errors(agent: Any, fake_nucleus: FakeNucleus, s: aiohttp.ClientSession,
                             url: str) -> tuple[list[int], int, aiohttp.ClientResponse]:
    """20 page views sent and held in flight (the upstream reads them and does not answer),
    then error reports, 5 a request, until a request is refused or the cap drops: the ids
    stored, the next id and the last answer."""
    async with s.post(url, json={"data": sized(range(20), "event")}) as r:
        assert r.status == 200, await r.text()
    await wait_for(lambda: len(fake_nucleus.events) == 20)   # in flight, unanswered
    stored: list[int] = []
    n = 100
    while True:
        assert n < 5000, "the spool never filled"
        async with s.post(url, json={"data": sized(range(n, n + 5), "error")}) as r:
            if r.status != 200 or agent.spool.counters.get("dropped_full", 0):
                return stored, n, r
        stored += range(n, n + 5)
        n += 5


async def test_drop_oldest_keeps_the_high_lane_while_normal_events_are_in_flight(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """The app's page views are on their way upstream (answer held) when an error loop
    fills the spool under drop_oldest. High events go only once no normal event is left,
    and these page views are still queued, to be delivered (their ack frees the room) or
    dropped (their send failed) first: the request waits for that answer (503 and
    Retry-After). The cap dropped the oldest error reports instead, and the page views
    were then delivered: the errors were lost, the page views outlived them."""
    agent, url = await dropping_oldest(make_agent, fake_nucleus, timeout_s=60)
    async with aiohttp.ClientSession() as s, answered_at_last(fake_nucleus):
        stored, n, r = await filled_with_errors(agent, fake_nucleus, s, url)
        assert agent.spool.counters.get("dropped_full", 0) == 0, "an error report dropped"
        assert r.status == 503 and int(r.headers["Retry-After"]) > 0, r.status
        async with s.post(url, json={"data": sized(range(80, 90), "event")}) as r:
            assert r.status == 503, "page views stored in error reports' place"
        fake_nucleus.answering.set()
        await wait_for(lambda: agent.forwarding.states["up"].acked >= 20)
        async with s.post(url, json={"data": sized(range(n, n + 5), "error")}) as r:
            assert r.status == 200, await r.text()   # the page views' room
        stored += range(n, n + 5)
    await wait_for(lambda: agent.spool.depth == 0, timeout=30)
    got = fake_nucleus.ids()
    assert [i for i in got if i >= 100] == stored
    counters = agent.spool.counters
    assert counters.get("dropped_full", 0) == 0
    assert counters["ingested"] == counters["acked"] == 20 + len(stored)


async def test_drop_oldest_refuses_high_events_only_until_a_send_that_is_never_answered_times_out(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """The page views in flight to an upstream that never answers hold the high lane's room
    only until their send times out (timeout_s): then they are queued, not in flight, and
    the cap drops them, the oldest normal events, for the error reports. Refused for as
    long as the upstream stays silent, the app's error reports would be lost."""
    agent, url = await dropping_oldest(make_agent, fake_nucleus, timeout_s=1)
    async with aiohttp.ClientSession() as s, answered_at_last(fake_nucleus):
        stored, n, r = await filled_with_errors(agent, fake_nucleus, s, url)
        assert r.status == 503, r.status
        assert agent.spool.counters.get("dropped_full", 0) == 0
        await wait_for(lambda: agent.forwarding.states["up"].retries >= 1)   # timed out

        async def taken() -> bool:
            async with s.post(url, json={"data": sized(range(n, n + 5), "error")}) as r:
                assert r.status in (200, 503), await r.text()
                return r.status == 200
        await wait_for(taken, timeout=30)
        stored += range(n, n + 5)
        assert agent.spool.counters["dropped_full"] == 20   # the page views, not an error
    await wait_for(lambda: agent.spool.depth == 0, timeout=30)
    assert [i for i in fake_nucleus.ids() if i >= 100] == stored
