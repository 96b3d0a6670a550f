"""A v2 spool (from before the kept dead-letter summary) becomes v3 with nothing lost, its
summary counted once from its letters; an agent on it then keeps the summary as letters
come and go.

tests/data/spool-v2.db was written by the code of fead784 (tests/data/make_v2.py): one
Nucleus key with 10 events acked, 20 dead-lettered in five commits an hour apart under
two upstreams and three reasons, and 10 queued (two in the high lane).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.settings import StorageConfig
from agent.spool import Spool, dead, dead_live
from agent.spool.migrate import upgrade
from agent.spool.schema import VERSION
from tests.spool_files import DATA, connect, copy_of, failed_midway_changes_nothing, table

FIXTURE = DATA / "spool-v2.db"
KEPT = ("records", "dead", "spent", "counters", "streams", "clock_marks")


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    return copy_of(FIXTURE, tmp_path)


def counted(path: Path) -> list[tuple[object, ...]]:
    """Each (reason, upstream) group of the letters, counted from every letter."""
    return table(path, "SELECT reason, upstream, count(*), min(at), max(at) FROM dead "
                       "GROUP BY reason, upstream ORDER BY max(at) DESC, reason, upstream")


def summarised(path: Path, newest: int | None = None) -> list[tuple[object, ...]]:
    with connect(path) as db:
        got = dead.summary(db, newest)
    return sorted(((g["reason"], g["upstream"], g["count"], g["oldest"], g["newest"])
                   for g in got["groups"]), key=lambda g: (-int(str(g[4])), g[0], g[1]))


def test_the_v2_fixture_is_migrated_with_nothing_lost(v2: Path) -> None:
    assert table(v2, "PRAGMA user_version") == [(2,)]
    kept = {name: table(v2, f"SELECT * FROM {name} ORDER BY 1") for name in KEPT}
    groups = counted(v2)
    assert len(groups) == 6 and sum(int(str(g[2])) for g in groups) == 20
    # Read-only before an agent converts it (`outpost dead list`, `outpost status`).
    assert summarised(v2) == groups

    with connect(v2) as db:
        upgrade(db)

    assert table(v2, "PRAGMA user_version") == [(VERSION,)] == [(6,)]
    assert table(v2, "PRAGMA integrity_check") == [("ok",)]
    # The letters gain the column for their agent-observed time, unknown (None) for these.
    kept["dead"] = [(*row, None) for row in kept["dead"]]
    for name, rows in kept.items():
        assert table(v2, f"SELECT * FROM {name} ORDER BY 1") == rows, name
    # The summary the spool now keeps is what counting every letter said.
    assert summarised(v2) == groups
    with connect(v2) as db:
        assert dead.summary(db)["count"] == 20


def test_a_failure_mid_migration_leaves_the_v2_file_as_it_was(v2: Path) -> None:
    # The tables are made, then a trigger is refused.
    failed_midway_changes_nothing(v2, sqlite3.SQLITE_CREATE_TRIGGER)


async def test_a_migrated_v2_spool_keeps_its_summary_as_letters_come_and_go(v2: Path) -> None:
    spool = await Spool.open(StorageConfig(path=str(v2)))
    try:
        assert spool.dead_count == 20
        stream = spool.streams["app-1"]
        rows = await spool.fetch(stream.id, 0, 3)
        await spool.dead_letter([(r.seq, "up", "HTTP 400: bad") for r in rows])
        assert await dead_live.retry(spool, dead.Which("HTTP 413: big")) == 7
        assert await dead_live.purge(spool, dead.Which("HTTP 422: odd")) == 7
    finally:
        await spool.close()
    assert summarised(v2) == counted(v2)
    assert [g[:2] for g in counted(v2)] == [("HTTP 400: bad", "up"), ("HTTP 400: bad", "other")]
    assert summarised(v2, 1) == counted(v2)[:1]
