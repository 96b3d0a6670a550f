"""A v3 spool (from before the built-in dictionary) becomes v4 with nothing changed but its
version: its records, packed with zstd alone, are read as they are, and new small records
are packed with the dictionary beside them.

tests/data/spool-v3.db was written by the code of f6cd264 (tests/data/make_v3.py): a
Nucleus key with 12 events (4 acked, 2 dead-lettered, 6 queued in three commits, one in
the high lane) and a Segment key with 5 queued in two commits.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from agent.families.event import SEGMENT, Event, dedupe_key
from agent.families.lanes import NORMAL
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.migrate import upgrade
from agent.spool.records import ZSTD, ZSTD_DICT, ZSTD_IDS, unpack
from agent.spool.schema import VERSION
from tests.spool_files import DATA, connect, copy_of, table

FIXTURE = DATA / "spool-v3.db"
KEPT = ("records", "dead", "spent", "counters", "streams", "clock_marks", "dead_groups",
        "dead_times")


@pytest.fixture
def v3(tmp_path: Path) -> Path:
    return copy_of(FIXTURE, tmp_path)


def test_the_v3_fixture_is_migrated_with_nothing_changed_but_its_version(v3: Path) -> None:
    assert table(v3, "PRAGMA user_version") == [(3,)]
    kept = {name: table(v3, f"SELECT * FROM {name} ORDER BY 1") for name in KEPT}
    assert {data[0] for (data,) in table(v3, "SELECT data FROM records")} == {ZSTD, ZSTD_IDS}

    with connect(v3) as db:
        upgrade(db)

    assert table(v3, "PRAGMA user_version") == [(VERSION,)] == [(4,)]
    assert table(v3, "PRAGMA integrity_check") == [("ok",)]
    for name, rows in kept.items():
        assert table(v3, f"SELECT * FROM {name} ORDER BY 1") == rows, name


async def test_an_agent_on_a_v3_spool_reads_every_event_and_packs_new_ones_with_the_dictionary(
        v3: Path) -> None:
    before = {seq: body for (seq, data) in table(v3, "SELECT id, data FROM records")
              for seq, body in enumerate(unpack(data), seq)}
    spool = await Spool.open(StorageConfig(path=str(v3)))
    try:
        assert spool.depth == 11 and spool.dead_count == 2
        queued = {}
        for key in ("app-1", "wk-1"):
            for row in await spool.fetch(spool.streams[key].id, 0, 100):
                queued[row.seq] = row.body
        # Every queued event, as v3 stored it (the dead-lettered ones are gone from the queue).
        assert queued == {seq: body for seq, body in before.items() if seq not in (5, 6)}
        event = Event("wk-1", SEGMENT, dedupe_key("segment", "wk-1", "m-new"),
                      orjson.dumps({"type": "track", "event": "new", "messageId": "m-new"}),
                      None, NORMAL)
        assert await spool.append([event]) == 1
        rows = await spool.fetch(spool.streams["wk-1"].id, 0, 100)
        assert [r.body for r in rows][-1] == event.body
    finally:
        await spool.close()
    tags = table(v3, "SELECT id, substr(data, 1, 1) FROM records ORDER BY id")
    assert tags[-1][1] == bytes([ZSTD_DICT]) and {t for _, t in tags[:-1]} <= {
        bytes([ZSTD]), bytes([ZSTD_IDS])}
    assert table(v3, "PRAGMA user_version") == [(4,)]


def test_a_v3_file_that_another_process_migrated_meanwhile_is_left_alone(v3: Path) -> None:
    with connect(v3) as db:
        upgrade(db)
    migrated = v3.read_bytes()
    with connect(v3) as db:
        upgrade(db)
        assert db.execute("PRAGMA user_version").fetchone() == (4,)
    assert v3.read_bytes() == migrated
    with sqlite3.connect(v3) as db:
        assert db.execute("SELECT count(*) FROM records").fetchone() == (5,)
