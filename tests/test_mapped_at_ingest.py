"""Where mapping happens (docs/architecture.md): an app's events routed to an upstream
of the other family are mapped once, at ingest, and stored mapped; what the upstream
gets is what mapping at send time gives, and a reload that routes the key to an upstream
of the events' own family gives it the original events back."""

from __future__ import annotations

import asyncio
import gc
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.config import parse
from agent.device import DeviceConfig, detect
from agent.families.enrich import Enrich
from agent.families.event import NUCLEUS, SEGMENT, Event, dedupe_key
from agent.families.mapping import nucleus_to_segment, segment_to_nucleus
from agent.families.nucleus import accept
from agent.server.limits import RouteLimits
from agent.settings import StorageConfig, UpstreamConfig
from agent.spool import Spool
from agent.spool.types import Queued
from agent.uplinks.nucleus_ws import NucleusWsUplink
from tests.conftest import free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.load_bodies import nucleus_body
from tests.segment_helpers import basic, call, nucleus_up, segment_up, tail_messages, wait_for
from tests.waiting import LoopTurns

EVENTS = [
    {"type": "event", "name": "click", "id": 7, "date": "2026-01-15T10:20:30.123Z",
     "machineId": "m1", "sessionId": 42, "userId": "u", "payload": {"x": [1, {"y": None}]},
     "customField": {"kept": True}},
    {"type": "nucleus:view", "name": "Settings", "id": "s-8", "date": 1767225600123,
     "deviceId": "d", "anonId": "a", "sessionId": 42},
    {"type": "props", "id": 9, "date": "2026-06-01T12:00:00", "machineId": "m1",
     "payload": {"plan": "pro"}, "locale": "fr-FR"},
]


def offline_segment() -> dict[str, Any]:
    return {"name": "segment", "protocol": "segment-http",
            "url": f"http://127.0.0.1:{free_port()}", "flush_interval_s": 0.05, "timeout_s": 2}


def without(ev: dict[str, Any], *fields: str) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if k not in fields}


async def test_nucleus_events_routed_to_segment_are_stored_mapped(make_agent: Any) -> None:
    agent = await make_agent(upstreams=[offline_segment()])
    reply = await call(agent.port, "/app/k/track", {"data": EVENTS})
    assert reply.json() == {"reportedIds": [7, "s-8", 9]}
    rows = await agent.spool.fetch(agent.spool.streams["k"].id, 0, 10)
    assert [r.family for r in rows] == [SEGMENT] * 3
    for row, ev in zip(rows, EVENTS, strict=True):
        stored = orjson.loads(row.body)
        # What mapping at send time gives, but for receivedAt: the request's time, not
        # the commit's (the same instant within the request's commit).
        assert without(stored, "receivedAt") == without(
            nucleus_to_segment(ev, row.received), "receivedAt")
        assert abs(row.received - _ms(stored["receivedAt"])) < 5_000


async def test_a_key_routed_to_nucleus_stores_nucleus_events_as_they_came(
        make_agent: Any) -> None:
    offline = {"name": "n", "protocol": "nucleus-http",
               "url": f"http://127.0.0.1:{free_port()}", "flush_interval_s": 0.05}
    agent = await make_agent(upstreams=[offline_segment() | {"keys": ["web"]}, offline])
    assert (await call(agent.port, "/app/k/track", {"data": EVENTS[:1]})).status == 200
    rows = await agent.spool.fetch(agent.spool.streams["k"].id, 0, 10)
    assert [(r.family, orjson.loads(r.body)) for r in rows] == [(NUCLEUS, EVENTS[0])]


async def test_stored_mapped_then_routed_to_nucleus_arrives_as_sent(
        make_agent: Any, tmp_path: Path, fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[offline_segment()])
    assert (await call(agent.port, "/app/k/track", {"data": EVENTS})).status == 200
    write_config(Path(agent.config_path), tmp_path / "spool.db",
                 upstreams=[nucleus_up(fake_nucleus)])
    await agent.reload()
    await wait_for(lambda: len(fake_nucleus.events) == 3)
    assert fake_nucleus.events == EVENTS   # ids, dates and unknown fields included


async def test_a_name_beside_an_old_event_key_of_the_same_name_comes_back_as_sent(
        make_agent: Any, tmp_path: Path, fake_nucleus: FakeNucleus) -> None:
    # A client written from the Tracking API's doc: its example's `event` key (the name
    # of the event) and its table's `name`, the same. Mapped to Segment, the `name` went
    # into `event` alone, so mapping back read the name as the old key's and gave an
    # event without `name`, that maps to another messageId: not the event stored. The
    # Nucleus upstream then got it mapped anew, the app's id and `event` key gone and
    # its whole Segment form in the payload.
    ev = {"event": "Clicked", "name": "Clicked", "id": 4, "date": "2026-01-15T10:20:30.123Z",
          "machineId": "m1", "sessionId": 42, "payload": {"x": 1}}
    agent = await make_agent(upstreams=[offline_segment()])
    assert (await call(agent.port, "/app/k/track", {"data": [ev]})).json() == {
        "reportedIds": [4]}
    write_config(Path(agent.config_path), tmp_path / "spool.db",
                 upstreams=[nucleus_up(fake_nucleus)])
    await agent.reload()
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    assert fake_nucleus.events == [ev]


async def test_stored_mapped_reaches_segment_once_in_order(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment, batch_max_events=2)])
    for _ in range(2):   # a module resending its queue: stored once
        assert (await call(agent.port, "/app/k/track", {"data": EVENTS})).status == 200
    seg = {"type": "track", "userId": "u", "event": "after", "messageId": "after-1"}
    assert (await call(agent.port, "/v1/track", seg,
                       headers={"Authorization": basic("k")})).status == 200
    await wait_for(lambda: agent.spool.depth == 0 and len(fake_segment.events) == 4)
    got = fake_segment.events
    assert [e["type"] for e in got] == ["track", "screen", "identify", "track"]
    assert [e["context"]["nucleus"]["id"] for e in got[:3]] == [7, "s-8", 9]
    assert got[3]["messageId"] == "after-1"


async def test_the_tail_shows_the_event_the_app_sent(make_agent: Any) -> None:
    """`outpost tail` is what apps are sending: a Nucleus event, whatever it is stored as."""
    agent = await make_agent(upstreams=[offline_segment()], port=free_port())
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}/tail") as resp:
        assert b'"watching"' in await resp.content.readline()
        reply = await call(agent.port, "/app/k/track", {"data": [
            {"type": "warp", "id": 1}, {"type": "event", "id": 2},
            {"type": "event", "name": "ok", "id": 3}]})
        assert reply.status == 200, reply.body
        got = await tail_messages(resp, 3)
    assert [(m["api"], m["id"], m["type"], m["warnings"]) for m in got] == [
        ("nucleus", "1", "warp", ["unknown type 'warp'"]),
        ("nucleus", "2", "event", ["missing field `name`"]), ("nucleus", "3", "event", [])]


def too_deep_to_map(pad: int = 0) -> str:
    """A Nucleus message: an error whose payload goes two levels deeper once mapped
    (context.nucleus.payload), past the 255 levels orjson writes (spelled out: orjson
    would not write the request), padded by ``pad`` bytes; then EVENTS[0]."""
    deep = '{"a":' * 252 + "1" + "}" * 252
    error = ('{"type":"error","name":"Deep","id":1,"date":"2026-01-15T10:20:30.123Z",'
             f'"pad":"{"x" * pad}","payload":{deep}}}')
    return '{"data":[' + error + "," + orjson.dumps(EVENTS[0]).decode() + "]}"


async def test_an_event_too_deep_to_map_is_left_out_at_ingest(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """Refused at ingest (left out of `reportedIds`), never stored to be dead-lettered
    "corrupt row" at its first send."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, "/app/k/track", too_deep_to_map())
    assert reply.json() == {"reportedIds": [7]}
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.events[0]["context"]["nucleus"]["id"] == 7
    assert agent.spool.dead_count == 0


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def test_a_resend_the_spool_knows_is_not_mapped_again() -> None:
    cfg = parse({"upstream": [offline_segment()]})
    limits = RouteLimits(cfg, lambda up: None, lambda up: SEGMENT)
    events = [Event("k", NUCLEUS, dedupe_key("k", i), orjson.dumps(ev))
              for i, ev in enumerate(EVENTS)]
    fresh = limits.as_stored(events)
    assert [e.family for e in fresh] == [SEGMENT] * 3
    # The first two are resends of stored events: kept as sent, the spool drops them.
    again = limits.as_stored(events, {events[0].dedupe, events[1].dedupe})
    assert again[:2] == events[:2] and again[2].family == SEGMENT


def test_the_event_as_parsed_at_ingest_maps_to_its_body_s_bytes_and_is_let_go() -> None:
    """A key whose events are mapped keeps each event as ingest parsed it, so that the
    mapping need not parse its body again: the same bytes as from the body, and let go
    once mapped (resends too), since the request's events are held to the commit."""
    limits = RouteLimits(parse({"upstream": [offline_segment()]}), lambda up: None,
                         lambda up: SEGMENT)
    enrich = Enrich(detect(DeviceConfig()))
    assert limits.maps_key("k")
    message = {"data": [*EVENTS, {"type": "init", "id": 10}]}  # enriched, dated at ingest
    assert all(e.parsed is None for e in accept(orjson.loads(orjson.dumps(message)), "k",
                                                enrich).events)
    kept = accept(message, "k", enrich, keep_parsed=True).events
    assert all(e.parsed is not None for e in kept)
    from_body = [Event(e.key, e.family, e.dedupe, e.body) for e in kept]
    stored = limits.as_stored(kept + from_body)   # one call: one receive time
    assert [e.body for e in stored[:4]] == [e.body for e in stored[4:]]
    assert {e.family for e in stored} == {SEGMENT}
    assert all(e.parsed is None for e in kept)
    resent = accept(orjson.loads(orjson.dumps(message)), "k", enrich, keep_parsed=True).events
    assert limits.as_stored(resent, {e.dedupe for e in resent}) == resent
    assert all(e.parsed is None for e in resent)


async def test_a_large_event_that_cannot_be_mapped_is_refused_not_a_500(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    # Too large for the cheap bound (so it is mapped to be measured) and too deep to map:
    # the module is told it was not taken (left out of reportedIds), and the rest is.
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, "/app/k/track", too_deep_to_map(pad=12_000))
    assert reply.status == 200, reply.body
    assert reply.json() == {"reportedIds": [7]}
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert agent.spool.dead_count == 0


# -- Segment events routed to a Nucleus upstream ------------------------------------

SEGMENT_EVENTS = [
    {"type": "track", "event": "Product Viewed", "userId": "u", "messageId": "m-1",
     "timestamp": "2026-01-15T10:20:30.123Z",
     "properties": {"id": "sku-1", "price": 9.5},   # a nested `id`, as shops send
     "context": {"device": {"id": "dev-1"}, "library": {"name": "analytics.js"}}},
    {"type": "identify", "userId": "u", "messageId": "m-2", "traits": {"plan": "pro"}},
    {"type": "page", "anonymousId": "a", "messageId": "m-3", "name": "Home",
     "properties": {"path": "/"}},
]


def offline_nucleus() -> dict[str, Any]:
    return {"name": "n", "protocol": "nucleus-http",
            "url": f"http://127.0.0.1:{free_port()}", "flush_interval_s": 0.05}


async def post_segment(port: int, key: str = "w") -> None:
    reply = await call(port, "/v1/batch", {"batch": SEGMENT_EVENTS},
                       headers={"Authorization": basic(key)})
    assert reply.status == 200, reply.body


async def test_segment_events_routed_to_nucleus_are_stored_mapped(make_agent: Any) -> None:
    """Stored as Nucleus events without an `id` (the uplink gives each its seq), each
    what mapping its Segment form at send time gives: the form a key routed to a Segment
    upstream stores."""
    agent = await make_agent(upstreams=[offline_segment() | {"keys": ["seg"]},
                                        offline_nucleus()])
    await post_segment(agent.port, "w")
    await post_segment(agent.port, "seg")
    mapped = await agent.spool.fetch(agent.spool.streams["w"].id, 0, 10)
    as_segment = await agent.spool.fetch(agent.spool.streams["seg"].id, 0, 10)
    assert [r.family for r in mapped] == [NUCLEUS] * 3
    assert [r.family for r in as_segment] == [SEGMENT] * 3
    for row, seg, sent in zip(mapped, as_segment, SEGMENT_EVENTS, strict=True):
        stored, original = orjson.loads(row.body), orjson.loads(seg.body)
        assert "id" not in stored
        # What ingest stamps is each request's own time: receivedAt, and a timestamp
        # for an event that had none (both kept in payload.$segment).
        kept = stored["payload"]["$segment"]
        original["receivedAt"] = kept["receivedAt"]
        if "timestamp" not in sent:
            original["timestamp"] = kept["timestamp"]
        assert stored == segment_to_nucleus(original, row.received, agent.facts.machineId)


async def test_stored_mapped_to_nucleus_goes_with_seqs_as_ids_once_in_order(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus, batch_max_events=2)])
    for _ in range(2):   # an SDK resending its batch: stored once
        await post_segment(agent.port)
    await wait_for(lambda: agent.spool.depth == 0 and len(fake_nucleus.events) == 3)
    got = fake_nucleus.events
    assert [e["payload"]["messageId"] for e in got] == ["m-1", "m-2", "m-3"]
    assert [e["type"] for e in got] == ["event", "props", "nucleus:view"]
    assert got[0]["payload"]["id"] == "sku-1" and got[0]["machineId"] == "dev-1"
    assert len({e["id"] for e in got}) == 3 and all(type(e["id"]) is int for e in got)


async def test_stored_mapped_to_nucleus_then_routed_to_segment_arrives_as_sent(
        make_agent: Any, tmp_path: Path, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[offline_nucleus()])
    await post_segment(agent.port)
    assert {r.family for r in await agent.spool.fetch(agent.spool.streams["w"].id, 0, 10)
            } == {NUCLEUS}
    write_config(Path(agent.config_path), tmp_path / "spool.db",
                 upstreams=[segment_up(fake_segment)])
    await agent.reload()
    await wait_for(lambda: len(fake_segment.events) == 3)
    for got, sent in zip(fake_segment.events, SEGMENT_EVENTS, strict=True):
        # What ingest adds to a Segment event (receivedAt; a timestamp when it had
        # none), and the sentAt of the upstream request; the rest exactly as sent.
        assert without(got, "receivedAt", "sentAt", "timestamp") == without(sent, "timestamp")
        assert got.get("timestamp", "") == sent.get("timestamp", got.get("timestamp"))


async def test_a_mapped_batch_is_spliced_to_the_bytes_mapping_at_send_time_gives(
        tmp_path: Path) -> None:
    """The drain sends stored bytes: each event's seq put last as its `id`, the bytes the
    take loop made by mapping the Segment event at send time (nested ids and all)."""
    cfg = parse({"upstream": [offline_nucleus()]})
    # The device's id, as the uplinks below have it (a userId-only event's machineId).
    limits = RouteLimits(cfg, lambda up: None, lambda up: NUCLEUS, machine="m")
    originals = [orjson.dumps(ev | {"receivedAt": "2026-01-15T10:20:31.000Z"})
                 for ev in SEGMENT_EVENTS]
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    try:
        await spool.append(limits.as_stored(
            [Event("w", SEGMENT, dedupe_key("w", i), b) for i, b in enumerate(originals)]))
        await spool.append([Event("s", SEGMENT, dedupe_key("s", i), b)
                            for i, b in enumerate(originals)])
        async with aiohttp.ClientSession() as session:
            up = NucleusWsUplink(UpstreamConfig(name="n", protocol="nucleus-ws",
                                                url="ws://127.0.0.1:9"), "w", session, "m")
            spliced = up.prepare(await spool.fetch(spool.streams["w"].id, 0, 10))
            at_send = NucleusWsUplink(up.cfg, "s", session, "m").prepare(
                list(await spool.fetch(spool.streams["s"].id, 0, 10)))
    finally:
        await spool.close()
    assert spliced.ids == spliced.seqs and len(spliced.seqs) == 3
    assert isinstance(spliced.rows, Queued)   # spliced: no Row, no parse per event
    for body, seq, other, other_seq in zip(spliced.bodies, spliced.seqs, at_send.bodies,
                                           at_send.seqs, strict=True):
        assert body.endswith(b',"id":%d}' % seq)
        assert body[:-len(b"%d}" % seq)] == other[:-len(b"%d}" % other_seq)]


async def test_mapping_a_large_request_never_holds_the_event_loop_long(
        make_agent: Any) -> None:
    """A 4 MiB Nucleus post (~38,000 events) whose key is routed to a Segment upstream:
    mapped on the loop, it held one turn for the whole mapping (0.7 s on a slow 2-core
    machine; /healthz waited as long). Large requests are mapped on the parse worker.
    Measured as tests/test_nucleus_frames.py measures it: this thread's CPU time a turn
    of the loop (LoopTurns; another process's load does not stretch it), the collector
    off."""
    agent = await make_agent(upstreams=[offline_segment()])
    body = nucleus_body(1)
    gc.disable()
    try:
        async with LoopTurns(every=0) as turns:   # looks every turn
            reply = await call(agent.port, "/app/k/track", body)
    finally:
        gc.enable()
    assert reply.status == 200, reply.body
    rows = await agent.spool.fetch(agent.spool.streams["k"].id, 0, 100_000)
    assert len(rows) == len(reply.json()["reportedIds"]) > 30_000
    assert {r.family for r in rows} == {SEGMENT}
    assert turns.worst < 0.1, f"the loop ran {turns.worst * 1000:.0f} ms of CPU in one turn"


def nucleus_event(key: str, n: int) -> Event:
    body = orjson.dumps({"type": "event", "name": f"e{n}", "id": n,
                         "date": "2026-01-15T10:20:30.123Z"})
    return Event(key, NUCLEUS, dedupe_key("nucleus", key, n), body, n)


@pytest.mark.parametrize("route", ["nucleus", "segment"])
async def test_a_large_request_keeps_its_place_before_a_later_one(make_agent: Any,
                                                                  route: str) -> None:
    """Two requests of one key, the larger (300 events) reaching the store first: stored
    first, whether its events are stored as they came or mapped (to Segment, on the
    parse worker: the request takes its place in the commit order before it goes)."""
    agent = await make_agent(upstreams=[offline_nucleus() if route == "nucleus"
                                        else offline_segment()])
    first = asyncio.ensure_future(agent.sink.store([nucleus_event("k", i) for i in range(300)]))
    await asyncio.sleep(0)    # the first request is in store
    second = asyncio.ensure_future(agent.sink.store([nucleus_event("k", 300)]))
    assert await first == 300 and await second == 1
    rows = await agent.spool.fetch(agent.spool.streams["k"].id, 0, 1000)
    assert {r.family for r in rows} == {NUCLEUS if route == "nucleus" else SEGMENT}
    ids = [orjson.loads(r.body)["context"]["nucleus"]["id"] if route == "segment"
           else orjson.loads(r.body)["id"] for r in rows]
    assert ids == list(range(301)), f"stored order starts {ids[:3]}"


async def test_a_batch_naming_two_keys_maps_only_the_events_whose_key_maps(
        make_agent: Any) -> None:
    """One `/v1/batch` whose messages name their own write keys: the first key's route
    (Segment) decides nothing for the second's (Nucleus)."""
    agent = await make_agent(upstreams=[offline_segment() | {"keys": ["seg"]},
                                        offline_nucleus()])
    batch = [ev | {"writeKey": key} for ev, key in zip(SEGMENT_EVENTS, ["seg", "w", "seg"],
                                                        strict=True)]
    reply = await call(agent.port, "/v1/batch", {"batch": batch})
    assert reply.status == 200, reply.body
    as_segment = await agent.spool.fetch(agent.spool.streams["seg"].id, 0, 10)
    mapped = await agent.spool.fetch(agent.spool.streams["w"].id, 0, 10)
    assert [r.family for r in as_segment] == [SEGMENT] * 2
    assert [r.family for r in mapped] == [NUCLEUS]
    assert orjson.loads(mapped[0].body)["payload"]["$segment"]["messageId"] == "m-2"
