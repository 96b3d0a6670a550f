"""A v1 spool (from before priority lanes) becomes v2 with nothing lost, and its queue is
served lane by lane.

tests/data/spool-v1.db was written by the code of ca0bdb3 (tests/data/make_v1.py):
records [1 init(acked) e1 e2 e3] [5 e4 e5(dead) e6] [8 error e8 e9] of a Nucleus key,
[11 Opened t1 t2] [14 t3..t5 acked: spent] [17 Error: dead] [18 identify] of a Segment
key, resends (duplicates), counters and clock marks.
"""

from __future__ import annotations

import contextlib
import sqlite3
from array import array
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.families.event import NUCLEUS, SEGMENT, Event, dedupe_key
from agent.families.lanes import HIGH, NORMAL
from agent.settings import StorageConfig
from agent.spool import Spool, dead, dead_live, records
from agent.spool.migrate import upgrade
from agent.spool.salvage import Carry, salvage
from agent.spool.schema import SCHEMA, VERSION
from tests.spool_files import DATA, connect, copy_of, failed_midway_changes_nothing, table

FIXTURE = DATA / "spool-v1.db"
TABLES = ("spent", "counters", "streams", "clock_marks")


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    return copy_of(FIXTURE, tmp_path)


def test_the_v1_fixture_is_migrated_with_nothing_lost(v1: Path) -> None:
    assert table(v1, "PRAGMA user_version") == [(1,)]
    records = table(v1, "SELECT * FROM records ORDER BY id")
    dead_rows = table(v1, "SELECT * FROM dead ORDER BY seq")
    kept = {name: table(v1, f"SELECT * FROM {name} ORDER BY 1") for name in TABLES}
    assert [r[0] for r in records] == [1, 5, 8, 11, 18] and len(dead_rows) == 2

    with connect(v1) as db:
        upgrade(db)

    # Through v2 and v3 to v6 (test_migrate_dead.py: the dead letters' kept summary).
    assert table(v1, "PRAGMA user_version") == [(VERSION,)] == [(6,)]
    assert table(v1, "SELECT reason, upstream, letters FROM dead_groups ORDER BY 1") == \
        table(v1, "SELECT reason, upstream, count(*) FROM dead GROUP BY 1, 2 ORDER BY 1")
    assert table(v1, "PRAGMA integrity_check") == [("ok",)]
    # Every queued event, its seq, gone bits and dedupe keys: the same rows, with a lane.
    # The init of record 1 is acked: no high event is left in it, so it stays normal.
    lanes = {1: NORMAL, 5: NORMAL, 8: HIGH, 11: HIGH, 18: NORMAL}
    assert table(v1, "SELECT * FROM records ORDER BY id") == [
        (*r, lanes[int(str(r[0]))]) for r in records]
    # With no agent-observed time of dead-lettering: not kept then (test_migrate_dead_seen.py).
    assert table(v1, "SELECT * FROM dead ORDER BY seq") == [
        (*dead_rows[0], NORMAL, None), (*dead_rows[1], HIGH, None)]   # an event; "Application Error"
    for name, rows in kept.items():
        assert table(v1, f"SELECT * FROM {name} ORDER BY 1") == rows, name
    assert table(v1, "SELECT name FROM sqlite_master WHERE type = 'index' "
                     "AND tbl_name = 'records'") == [("records_lane",)]


def _old(event: str, ev_id: int) -> bytes:
    """An event of an old Nucleus module (one `event` key), as a v1 spool stored it."""
    return orjson.dumps({"event": event, "id": ev_id, "machineId": "m1", "sessionId": "s1",
                         "date": "2026-11-01T00:00:00.000Z"})


def test_an_old_module_error_goes_high_as_at_ingest(v1: Path) -> None:
    """`{"event": "error:<kind>"}` is an error (agent/families/nucleus.py ``event_type``),
    high at ingest: the conversion put it in the normal lane, its quick test looking for
    `"error"` only."""
    queued = [[_old("Viewed", 10), _old("error:TypeError", 11)], [_old("Clicked", 12)]]
    letter = _old("error:RangeError", 13)
    with connect(v1) as db:
        db.execute("BEGIN")
        for rid, bodies in ((19, queued[0]), (21, queued[1])):
            size = sum(map(len, bodies))
            db.execute("INSERT INTO records VALUES (?, 1, ?, ?, 1796055407090, ?, NULL, ?, ?, ?)",
                       (rid, NUCLEUS, len(bodies), len(bodies), size,
                        array("q", range(rid, rid + len(bodies))).tobytes(),
                        records.pack(bodies)))
            db.execute("UPDATE streams SET depth = depth + ?, bytes = bytes + ? WHERE id = 1",
                       (len(bodies), size))
        db.execute("INSERT INTO dead VALUES (22, 1, ?, 1796055407090, 22, ?, 'up', 'HTTP 400: bad',"
                   " 1796055407091)", (NUCLEUS, letter))
        db.execute("COMMIT")
        upgrade(db)
    assert table(v1, "SELECT id, lane FROM records WHERE id > 18 ORDER BY id") == [
        (19, HIGH), (21, NORMAL)]
    assert table(v1, "SELECT seq, lane FROM dead WHERE seq = 22") == [(22, HIGH)]


def test_a_failure_mid_migration_leaves_the_v1_file_as_it_was(v1: Path) -> None:
    # The columns are added, then the new index is refused.
    failed_midway_changes_nothing(v1, sqlite3.SQLITE_CREATE_INDEX)


def _nucleus(i: int, kind: str) -> Event:
    body = {"type": kind, "name": f"n{i}", "id": i, "date": "2026-11-01T00:00:00.000Z",
            "sessionId": "s1", "machineId": "m1", "payload": {"i": i}}
    return Event("app-nucleus", NUCLEUS, dedupe_key("nucleus", "app-nucleus", i),
                 orjson.dumps(body))


async def test_a_migrated_v1_spool_serves_each_lane_in_order_and_still_dedupes(
        v1: Path) -> None:
    spool = await Spool.open(StorageConfig(path=str(v1)))
    try:
        n, s = spool.streams["app-nucleus"], spool.streams["seg-key"]
        assert (n.depth, n.high, s.depth, s.high) == (8, 3, 4, 3)
        ids = [orjson.loads(r.body)["id"] for r in await spool.fetch(n.id, 0, 100)]
        assert ids == [7, 8, 9, 1, 2, 3, 4, 6]   # the high record, then the normal ones
        # Resends of queued, acked and delivered events are still duplicates.
        assert await spool.append([_nucleus(i, "event") for i in (1, 2, 3)]
                                  + [_nucleus(0, "init")]) == 0
        seg = Event("seg-key", SEGMENT, dedupe_key("segment", "seg-key", "m-4"), b"{}")
        assert await spool.append([seg]) == 0   # delivered: its key is in ``spent``
        # Dead letters go back to the tail of their lane, in their old order.
        assert await dead_live.retry(spool, dead.Which(every=True)) == 2
        rows = await spool.fetch(s.id, 0, 100)
        names = [orjson.loads(r.body).get("event", "identify") for r in rows]
        assert names == ["Application Opened", "t1", "t2", "Application Error", "identify"]
        assert [r.lane for r in rows] == [HIGH] * 4 + [NORMAL]
        assert [orjson.loads(r.body)["id"] for r in await spool.fetch(n.id, 0, 100)] == \
            [7, 8, 9, 1, 2, 3, 4, 6, 5]
        assert (n.high, s.high) == (3, 4)
    finally:
        await spool.close()


def test_an_offline_dead_letter_change_on_a_spool_not_yet_converted_says_so(v1: Path) -> None:
    """`outpost dead retry` with no agent running, after an upgrade but before the agent
    started (and converted the spool): one line saying what to do, the file untouched."""
    before = v1.read_bytes()
    with pytest.raises(dead.DeadError, match=r"format v1.*start the agent once"):
        with dead.Offline(v1) as conn:
            dead.requeue_stopped(conn, dead.Which(every=True), 0, 0)
    assert v1.read_bytes() == before


def test_salvage_of_a_sound_v1_file_keeps_everything_and_classifies_it(tmp_path: Path) -> None:
    """A v1 file moved aside as corrupt is salvaged into a v2 spool as the conversion
    would have left it: every queued record, dead letter and spent key, with its lane."""
    fresh = tmp_path / "fresh.db"
    with contextlib.closing(sqlite3.connect(fresh, isolation_level=None)) as db:
        db.executescript(SCHEMA)
        got = salvage(db, FIXTURE, Carry(streams={}, counters={}, observed=0, next_seq=1,
                                         depth=None, dead=None))
        assert (got.queued, got.lost, got.skipped) == (12, 0, 0)
        assert db.execute("SELECT id, lane FROM records ORDER BY id").fetchall() == [
            (1, NORMAL), (5, NORMAL), (8, HIGH), (11, HIGH), (18, NORMAL)]
        assert db.execute("SELECT seq, lane FROM dead ORDER BY seq").fetchall() == [
            (6, NORMAL), (17, HIGH)]
        assert sum(len(k) // 8 for (k,) in db.execute("SELECT dkeys FROM spent")) == 4


@pytest.mark.parametrize("gone", [b"", 7], ids=["cut-short", "not-a-blob"])
async def test_a_v1_spool_whose_acked_bits_are_damaged_starts_and_drops_that_record_counted(
        v1: Path, gone: object, make_agent: Any) -> None:
    """Damage garbled the acked bits of one queued record of a v1 spool (cut short, or
    another type). The reader takes such bits as telling nothing and drops the record,
    counted, when it meets it (spool/reads.py); the conversion to lanes read them to
    classify the record and raised (IndexError, TypeError), its transaction rolled back:
    the agent failed at every start after the upgrade, its whole queue out of reach."""
    with connect(v1) as db:
        db.execute("UPDATE records SET gone = ? WHERE id = 8", (gone,))   # [8 error e8 e9]
        db.commit()
    agent = await make_agent(spool=v1)
    spool = agent.spool
    assert table(v1, "PRAGMA user_version") == [(VERSION,)]
    n = spool.streams["app-nucleus"]
    # The rest of the key's queue, as the conversion leaves it; the damaged record is
    # dropped as the reader meets it, its 3 events counted.
    assert [orjson.loads(r.body)["id"] for r in await spool.fetch(n.id, 0, 100)] == \
        [1, 2, 3, 4, 6]
    await spool.ack([])   # a commit: the damaged record found by the read goes in it
    assert spool.counters["dropped_corrupt"] == 3
    assert table(v1, "SELECT id, lane FROM records ORDER BY id") == [
        (1, NORMAL), (5, NORMAL), (11, HIGH), (18, NORMAL)]


@pytest.mark.parametrize(("damage", "lost", "letters"), [
    ("UPDATE dead SET body = CAST(body AS TEXT) WHERE seq = 6", 0, [6, 17]),
    ("UPDATE records SET data = 7 WHERE id = 8", 3, [6, 17]),
    ("UPDATE records SET n = 'three' WHERE id = 8", 3, [6, 17]),
    ("UPDATE records SET n = 1.5 WHERE id = 8", 3, [6, 17]),
], ids=["letter-body-text", "record-data-integer", "record-count-text", "record-count-real"])
async def test_a_v1_spool_holding_a_value_of_another_type_starts_and_loses_that_row_alone(
        v1: Path, damage: str, lost: int, letters: list[int], make_agent: Any) -> None:
    """Damage garbled one column of a v1 spool into another type (a dead letter's body
    into text, a record's packed events into a number, its count into text). The
    conversion to lanes read each as it came to classify the row and raised TypeError,
    its transaction rolled back: the agent failed at every start, its whole queue out of
    reach. Now it starts: the garbled record is lost, counted, the rest of the queue
    served, and the dead letters kept."""
    with connect(v1) as db:
        db.execute(damage)
        db.commit()
    agent = await make_agent(spool=v1)
    spool = agent.spool
    assert table(v1, "PRAGMA user_version") == [(VERSION,)]
    n = spool.streams["app-nucleus"]
    kept = [7, 8, 9] if not lost else []   # record 8: [error e8 e9], high once converted
    assert [orjson.loads(r.body)["id"] for r in await spool.fetch(n.id, 0, 100)] == \
        [*kept, 1, 2, 3, 4, 6]
    await spool.ack([])   # a commit: a damaged record found by the read goes in it
    assert spool.counters.get("dropped_corrupt", 0) == lost
    assert table(v1, "SELECT seq FROM dead ORDER BY seq") == [(s,) for s in letters]
