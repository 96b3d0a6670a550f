"""Same-family batches cut from stored bytes (agent/uplinks/splice.py) and the read view
they are cut from (spool.types.Queued): the splice never takes what the one-row-at-a-time
take loop would not, and a key's events reach the upstream exactly as stored, with the
ids ingest read, old records (no ids) and new ones alike."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.families.event import NUCLEUS, SEGMENT, Event, dedupe_key
from agent.settings import StorageConfig, UpstreamConfig
from agent.spool import Spool
from agent.spool.records import ZSTD_DICT, ZSTD_DICT_IDS
from agent.spool.types import Queued, Row, Run
from agent.uplinks import registry
from agent.uplinks.base import UplinkBase
from agent.uplinks.nucleus_http import NucleusHttpUplink
from agent.uplinks.nucleus_ws import NucleusWsUplink
from agent.uplinks.prepare import Prepared, take_prefix
from agent.uplinks.segment_http import SegmentHttpUplink
from agent.uplinks.splice import objects, stamped
from tests.fakes.nucleus_upstream import FakeNucleus

ID_POOL = ["a", "b", 1, 2, 2.5, None]


@st.composite
def runs(draw: st.DrawFn) -> list[Run]:
    out: list[Run] = []
    seq = draw(st.integers(1, 50))
    for _ in range(draw(st.integers(0, 5))):
        family = draw(st.sampled_from([NUCLEUS, SEGMENT]))
        n = draw(st.integers(1, 6))
        ids = [draw(st.sampled_from(ID_POOL)) for _ in range(n)]
        # Ids are stored only as ingest read them from the events' own bodies.
        stored_ids = ids if family == NUCLEUS and draw(st.booleans()) else None
        bodies = []
        for i in range(n):
            pad = "x" * draw(st.integers(0, 120))
            if family == NUCLEUS:
                ev = {"name": "e", "p": pad} if ids[i] is None else {"id": ids[i], "p": pad}
            else:
                ev = {"type": "track", "messageId": f"m{seq + i}", "p": pad}
            body = orjson.dumps(ev)
            if stored_ids is None and draw(st.integers(0, 15)) == 0:
                body = draw(st.sampled_from([b"{}", b"[1]", b'"s"', b"\xff"]))
            bodies.append(body)
        # As a read gives them: its record's longest and shortest body, which the unpack
        # measured, or not known (a Run made otherwise).
        known = draw(st.booleans())
        out.append(Run(seq, 1, family, 1_767_323_045_000, bodies, stored_ids,
                       longest=max(map(len, bodies)) if known else None,
                       shortest=min(map(len, bodies)) if known else None))
        seq += n + draw(st.integers(0, 2))   # a gap: events acked before
    return out


def config(cls: type[UplinkBase], events: int, nbytes: int) -> UpstreamConfig:
    spoken = next(p for p in registry.UPLINKS if p.uplink_class() is cls)
    return UpstreamConfig(name="u", protocol=spoken.name, url=f"{spoken.schemes[0]}://127.0.0.1:9",
                          batch_max_events=events, batch_max_bytes=nbytes)


def prefix_of(part: Prepared, whole: Prepared) -> None:
    """``part`` takes the first rows ``whole`` takes, each the same way (seqs and ids as
    tuples: a spliced batch's may be ranges)."""
    n = len(part.seqs)
    assert tuple(part.seqs) == tuple(whole.seqs[:n]) and part.bodies == whole.bodies[:n]
    assert tuple(part.ids) == tuple(whole.ids[:n])
    assert [r.seq for r in part.rows] == [r.seq for r in whole.rows][:len(part.rows)]


@settings(max_examples=400, deadline=None)
@given(runs(), st.sampled_from([NucleusWsUplink, NucleusHttpUplink, SegmentHttpUplink]),
       st.integers(1, 12), st.integers(40, 1500), st.lists(st.sampled_from(ID_POOL[:5])))
async def test_a_spliced_batch_is_what_the_take_loop_would_take(
        got: list[Run], cls: type[UplinkBase], events: int, nbytes: int,
        busy: list[Any]) -> None:
    queued = Queued(got)
    async with aiohttp.ClientSession() as session:
        fast, slow = (cls(config(cls, events, nbytes), "app", session, "m") for _ in "ab")
        for up in (fast, slow):
            if isinstance(up, NucleusWsUplink):
                up.in_flight = {i: -1 for i in busy}
        spliced = fast.prepare(queued)
        one_by_one = slow.prepare(list(queued))   # a list: the take loop alone
    assert bool(spliced.rows) == bool(one_by_one.rows)
    prefix_of(spliced, one_by_one)
    if spliced.refused:
        assert spliced == Prepared(tuple(spliced.rows), *(getattr(one_by_one, f) for f in
                                                           ("seqs", "bodies", "ids", "refused")))
    else:
        assert [r.seq for r in spliced.rows] == list(spliced.seqs)
    if isinstance(fast, NucleusWsUplink) and isinstance(slow, NucleusWsUplink):
        assert {i: s for i, s in fast.in_flight.items() if s != -1} == dict(
            zip(spliced.ids, spliced.seqs))


@settings(deadline=None)
@given(runs(), st.integers(-40, 40), st.integers(-40, 40))
def test_queued_is_the_sequence_of_its_rows(got: list[Run], a: int, b: int) -> None:
    queued = Queued(got)
    rows = [Row(r.first + i, r.stream, r.family, r.received, body)
            for r in got for i, body in enumerate(r.bodies)]
    assert list(queued) == rows and len(queued) == len(rows)
    assert list(queued[a:b]) == rows[a:b] and list(queued[a:]) == rows[a:]
    if -len(rows) <= a < len(rows):
        assert queued[a] == rows[a]
    else:
        with pytest.raises(IndexError):
            queued[a]
    assert [*queued[:a], *queued[a:]] == rows


def test_an_event_over_segments_limit_stops_the_splice_by_its_records_longest() -> None:
    """Under a batch cap far above Segment's 32 KB an event, a read's run whose record holds
    a longer event (its longest, measured by the unpack) is left to the take loop, which
    refuses that event; one whose record holds none longer is spliced whole."""
    small, big = orjson.dumps({"type": "track", "n": 1}), orjson.dumps({"p": "x" * 40_000})
    up = SegmentHttpUplink.__new__(SegmentHttpUplink)
    up.cfg = config(SegmentHttpUplink, 500, 500_000)
    up.limit = SegmentHttpUplink.event_limit(up.cfg)   # as __init__ sets it
    run = Run(10, 1, SEGMENT, 0, [small, big, small], None, longest=len(big),
              shortest=len(small))
    queued = Queued([run])
    batch = up.prepare(queued)
    assert batch.seqs == (10, 12) and [seq for seq, _ in batch.refused] == [11]
    fits = Run(10, 1, SEGMENT, 0, [small] * 3, None, longest=len(small), shortest=len(small))
    assert up.prepare(Queued([fits])).seqs == range(10, 13)   # a range: no int per event


def test_splice_takes_whole_runs_without_making_rows() -> None:
    """The common case, asserted outright: a record's events in one batch, as stored."""
    bodies = [orjson.dumps({"id": f"e{i}", "n": i}) for i in range(5)]
    queued = Queued([Run(10, 1, NUCLEUS, 0, bodies, [f"e{i}" for i in range(5)])])
    up = NucleusHttpUplink.__new__(NucleusHttpUplink)
    up.cfg = config(NucleusHttpUplink, 500, 500_000)
    up.limit = NucleusHttpUplink.event_limit(up.cfg)   # as __init__ sets it
    batch = up.prepare(queued)
    assert batch.seqs == (10, 11, 12, 13, 14) and batch.bodies == tuple(bodies)
    assert batch.ids == tuple(f"e{i}" for i in range(5)) and isinstance(batch.rows, Queued)
    assert take_prefix(up, list(queued), in_flight=()).bodies == batch.bodies


async def test_a_run_whose_ids_repeat_is_spliced_up_to_the_repeat() -> None:
    """Module ids are small and repeat (python's 1..10000: most 500-event runs hold a
    repeat). The batch is cut before the first id the take loop stops at, still from the
    stored bytes: the take loop parsed every event of such a run, one at a time."""
    ids: list[Any] = [1, 2, 3, 2, 4]
    bodies = [orjson.dumps({"id": i, "n": n}) for n, i in enumerate(ids)]
    queued = Queued([Run(10, 1, NUCLEUS, 0, bodies, ids)])
    async with aiohttp.ClientSession() as session:
        up = NucleusWsUplink(config(NucleusWsUplink, 500, 500_000), "app", session, "m")
        first = up.prepare(queued)
        assert first.seqs == (10, 11, 12) and first.bodies == tuple(bodies[:3])
        assert isinstance(first.rows, Queued)    # spliced: no Row made per event
        up.in_flight = {4: 99}                   # and stopping before one in flight
        second = up.prepare(queued[3:])
        assert second.seqs == (13,) and isinstance(second.rows, Queued)
    # Nothing in flight (nucleus-http, one request at a time): the repeat alone cuts it.
    http = NucleusHttpUplink.__new__(NucleusHttpUplink)
    http.cfg = config(NucleusHttpUplink, 500, 500_000)
    http.limit = NucleusHttpUplink.event_limit(http.cfg)   # as __init__ sets it
    batch = http.prepare(queued)
    assert batch.seqs == (10, 11, 12) and isinstance(batch.rows, Queued)


async def send_all(up: NucleusWsUplink, queued: Queued, sent: list[int], total: int) -> None:
    """Prepare and send what follows ``sent`` of ``queued`` (appended to it) until
    ``total`` are sent, each batch acknowledged whole by the fake upstream."""
    while len(sent) < total:
        batch = up.prepare(queued[len(sent):])
        result = await up.send(batch)
        assert result.seqs == batch.seqs   # type: ignore[union-attr]
        sent += batch.seqs


async def test_ids_ingest_read_are_stored_with_the_events_and_old_records_still_drain(
        tmp_path: Any) -> None:
    """Events of both layouts in one key's queue reach the upstream in order, each body as
    stored and acknowledged by its own id; an event without an id goes with its seq."""
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    fake = await FakeNucleus().start()
    try:
        def nucleus(i: int, read: bool, **extra: Any) -> Event:
            ev = {"name": "e", "n": i, **extra}
            kw = {"ack_id": extra.get("id")} if read else {}
            return Event("k", NUCLEUS, dedupe_key("k", i), orjson.dumps(ev), **kw)

        await spool.append([nucleus(i, False, id=f"old{i}") for i in range(3)])  # no ids
        await spool.append([nucleus(i, True, id=i) for i in range(3, 6)]
                           + [nucleus(6, True)])                                 # with ids
        tags = await spool.reader_side.read("SELECT substr(data, 1, 1) FROM records ORDER BY id")
        assert [t[0] for t in tags] == [bytes([ZSTD_DICT]), bytes([ZSTD_DICT_IDS])]
        queued = await spool.fetch(spool.streams["k"].id, 0, 100)
        assert [r.ids for r in queued.runs] == [None, [3, 4, 5, None]]
        cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=fake.url, timeout_s=5)
        async with aiohttp.ClientSession() as session:
            up = NucleusWsUplink(cfg, "k", session, "m")
            sent: list[int] = []
            await send_all(up, queued, sent, 7)
            await up.close()
        got = fake.events
        assert [ev["n"] for ev in got] == list(range(7))
        assert [ev["id"] for ev in got] == ["old0", "old1", "old2", 3, 4, 5, sent[6]]
    finally:
        await fake.stop()
        await spool.close()


@settings(max_examples=300, deadline=None)
@given(runs(), st.integers(1, 12), st.integers(40, 1500))
async def test_a_segment_request_body_stamps_every_event_as_stored_whichever_way_it_was_cut(
        got: list[Run], events: int, nbytes: int) -> None:
    """The request body holds each event sent, as stored, with `sentAt` put first; a batch
    the splice checked (``objects``) gives the same bytes as one checked again per body."""
    async with aiohttp.ClientSession() as session:
        up = SegmentHttpUplink(config(SegmentHttpUplink, events, nbytes), "app", session, "m")
        batch = up.prepare(Queued(got))
    if not batch.seqs:
        return
    at = "2026-01-02T03:04:05.006Z"
    body = up.payload(batch, at)
    unchecked = Prepared(batch.rows, batch.seqs, batch.bodies, batch.ids, batch.refused)
    assert body == up.payload(unchecked, at)
    for half in batch.halves():   # an empty half too (of a one-event batch)
        assert half.objects == batch.objects
        assert len(orjson.loads(up.payload(half, at))["batch"]) == len(half.bodies)
    sent = orjson.loads(body)
    assert sent["sentAt"] == at
    assert [list(ev) for ev in sent["batch"]] == [["sentAt", *orjson.loads(b)]
                                                  for b in batch.bodies]
    assert [ev.pop("sentAt") for ev in sent["batch"]] == [at] * len(batch.bodies)
    assert sent["batch"] == [orjson.loads(b) for b in batch.bodies]


async def test_events_without_an_id_are_spliced_with_their_seq_as_id(tmp_path: Any) -> None:
    """Some clients send no `id`: each such event goes with its seq as id, put last in its
    stored bytes, the very bytes the take loop made by parsing and dumping each one again
    (a drain of them was 2-3x the CPU per event of one with ids). A body that holds
    `"id":null` anywhere is left to the take loop, which replaces that member in place."""
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    fake = await FakeNucleus().start()
    try:
        def nucleus(i: int, **extra: Any) -> Event:
            ev = {"name": "e", "date": f"2026-01-15T10:20:{i % 60:02d}.000Z", "n": i, **extra}
            return Event("k", NUCLEUS, dedupe_key("k", i), orjson.dumps(ev),
                         ack_id=extra.get("id"))

        await spool.append([nucleus(i) for i in range(200)]
                           + [nucleus(200, id=7), nucleus(201), nucleus(202, id=None),
                              nucleus(203, payload={"id": 1}), nucleus(204)])
        queued = await spool.fetch(spool.streams["k"].id, 0, 1000)
        assert queued.runs[0].ids is not None and queued.runs[0].ids[0] is None
        seqs = [r.seq for r in queued]
        cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=fake.url, timeout_s=5)
        async with aiohttp.ClientSession() as session:
            up = NucleusWsUplink(cfg, "k", session, "m")
            first = up.prepare(queued)
            assert isinstance(first.rows, Queued)       # spliced: no Row, no parse per event
            # Up to the event whose id 7 is the 7th event's seq, its ack id in the batch.
            assert first.seqs == tuple(r.seq for r in list(queued)[:200]) and seqs[6] == 7
            one_by_one = take_prefix(up, list(queued), in_flight={})
            assert (first.seqs, first.bodies, first.ids) == (
                one_by_one.seqs, one_by_one.bodies, one_by_one.ids)
            result = await up.send(first)
            assert result.seqs == first.seqs   # type: ignore[union-attr]
            await send_all(up, queued, list(first.seqs), 205)
            await up.close()
        got = fake.events
        assert [ev["n"] for ev in got] == list(range(205))
        assert [ev["id"] for ev in got] == [*seqs[:200], 7, seqs[201], seqs[202], seqs[203],
                                            seqs[204]]
        assert got[203]["payload"] == {"id": 1}
    finally:
        await fake.stop()
        await spool.close()


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([b"", b"{", b"}", b"{}", b"{ }", b"[]", b"{}}", b'{"a":1}']),
                          st.binary(max_size=8)), max_size=6))
def test_objects_and_stamped_agree_with_a_look_at_each_body(bodies: list[bytes]) -> None:
    """``objects`` says what a look at each body says (`{`, more, `}`), and ``stamped`` puts
    the member first in each, as a body at a time would."""
    each = bool(bodies) and all(b[:1] == b"{" and b[-1:] == b"}" and b != b"{}" for b in bodies)
    assert objects(bodies) is each
    assert objects(tuple(bodies)) is each
    if each:
        assert stamped(bodies, b'"m":1', b"<", b">") == \
            b"<" + b",".join(b'{"m":1,' + b[1:] for b in bodies) + b">"
