"""A v3 spool (from before the built-in dictionary) and a v4 one (from before learned
dictionaries) become v5 (then v6) with nothing changed but their version and an empty
``dicts`` table: their records, packed with zstd alone (v3) or with the built-in dictionary (v4),
are read as they are, and new small records are packed with the built-in dictionary
beside them (until one is learned: tests/test_codebook.py).

tests/data/spool-v3.db and spool-v4.db were written by tests/data/make_v3.py, on the code
of f6cd264 and d561978: a Nucleus key with 12 events (4 acked, 2 dead-lettered, 6 queued
in three commits, one in the high lane) and a Segment key with 5 queued in two commits.
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
from agent.spool.db import PAST
from agent.spool.migrate import upgrade
from agent.spool.records import ZSTD, ZSTD_DICT, ZSTD_DICT_IDS, ZSTD_IDS, unpack
from agent.spool.schema import VERSION
from tests.spool_files import DATA, connect, copy_of, table

KEPT = ("records", "dead", "spent", "counters", "streams", "clock_marks", "dead_groups",
        "dead_times")
# version -> the codec tags its records were written with
TAGS = {3: {ZSTD, ZSTD_IDS}, 4: {ZSTD_DICT, ZSTD_DICT_IDS}}


@pytest.fixture(params=sorted(TAGS), ids=lambda v: f"v{v}")
def old(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, int]:
    """An older spool file, and its version."""
    return copy_of(DATA / f"spool-v{request.param}.db", tmp_path), request.param


def test_an_older_fixture_is_migrated_with_nothing_changed_but_its_version(
        old: tuple[Path, int]) -> None:
    path, version = old
    assert table(path, "PRAGMA user_version") == [(version,)]
    kept = {name: table(path, f"SELECT * FROM {name} ORDER BY 1") for name in KEPT}
    assert {data[0] for (data,) in table(path, "SELECT data FROM records")} == TAGS[version]

    with connect(path) as db:
        upgrade(db)

    assert table(path, "PRAGMA user_version") == [(VERSION,)] == [(6,)]
    assert table(path, "PRAGMA integrity_check") == [("ok",)]
    # And v6's: the letters' agent-observed times (test_migrate_dead_seen.py), unknown (None,
    # and db.PAST in their groups) for letters an agent made before it kept them.
    kept["dead"] = [(*row, None) for row in kept["dead"]]
    kept["dead_groups"] = [(*row, PAST, PAST) for row in kept["dead_groups"]]
    for name, rows in kept.items():
        assert table(path, f"SELECT * FROM {name} ORDER BY 1") == rows, name
    assert table(path, "SELECT count(*) FROM dicts") == [(0,)]


async def test_an_agent_on_an_older_spool_reads_every_event_and_packs_new_ones_with_the_dictionary(
        old: tuple[Path, int]) -> None:
    v3, version = old
    before = {seq: body for (seq, data) in table(v3, "SELECT id, data FROM records")
              for seq, body in enumerate(unpack(data), seq)}
    spool = await Spool.open(StorageConfig(path=str(v3)))
    try:
        assert spool.depth == 11 and spool.dead_count == 2
        queued = {}
        for key in ("app-1", "wk-1"):
            for row in await spool.fetch(spool.streams[key].id, 0, 100):
                queued[row.seq] = row.body
        # Every queued event, as the older agent stored it (the dead-lettered ones are gone from the queue).
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
    assert tags[-1][1] == bytes([ZSTD_DICT]) and {t[0] for _, t in tags[:-1]} <= TAGS[version]
    assert table(v3, "PRAGMA user_version") == [(VERSION,)]


def test_an_older_file_that_another_process_migrated_meanwhile_is_left_alone(
        old: tuple[Path, int]) -> None:
    v3 = old[0]
    with connect(v3) as db:
        upgrade(db)
    migrated = v3.read_bytes()
    with connect(v3) as db:
        upgrade(db)
        assert db.execute("PRAGMA user_version").fetchone() == (VERSION,)
    assert v3.read_bytes() == migrated
    with sqlite3.connect(v3) as db:
        assert db.execute("SELECT count(*) FROM records").fetchone() == (5,)
