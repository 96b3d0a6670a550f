"""A v5 spool (from before the dead letters' summary kept their agent-observed times)
becomes v6 with nothing lost, those times counted once from its letters; an agent on it
then shows its letters' ages by the time it saw pass, and keeps the summary as letters
come and go. One newer than the code is still refused, untouched.

tests/data/spool-v5.db was written by the code of eb9513b7 (tests/data/make_v5.py): one
Nucleus key with 2 events acked, 9 dead-lettered in three commits an hour apart by the
agent's clock (3 while the wall clock read 1970, 4 while it read ten years ahead, 2 with
it right; under two upstreams and three reasons), and 3 queued.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.settings import StorageConfig
from agent.spool import Spool, dead, dead_live
from agent.spool.migrate import upgrade
from agent.spool.schema import VERSION, SpoolTooNew
from tests.spool_files import DATA, connect, copy_of, failed_midway_changes_nothing, table
from tests.test_dead_ages import HOUR_S, about

FIXTURE = DATA / "spool-v5.db"
KEPT = {name: f"SELECT * FROM {name} ORDER BY 1" for name in (
    "records", "dead", "spent", "counters", "streams", "clock_marks", "dicts", "dead_times")}
KEPT["dead_groups"] = "SELECT id, reason, upstream, letters, oldest, newest FROM dead_groups"
# Each (reason, upstream) group as counting every letter finds it, newest first by the
# agent's clock.
COUNTED = ("SELECT reason, upstream, count(*), min(at), max(at), min(observed), max(observed) "
           "FROM dead GROUP BY reason, upstream ORDER BY max(observed) DESC")


@pytest.fixture
def v5(tmp_path: Path) -> Path:
    return copy_of(FIXTURE, tmp_path)


def summarised(path: Path) -> list[tuple[object, ...]]:
    """The groups the spool keeps, newest first, as they are kept."""
    with connect(path) as db:
        return [(g["reason"], g["upstream"], g["count"], g["oldest"], g["newest"],
                 g["first_seen"], g["last_seen"]) for g in dead.newest_groups(db, 100)]


def test_the_v5_fixture_is_migrated_with_nothing_lost(v5: Path) -> None:
    assert table(v5, "PRAGMA user_version") == [(5,)]
    kept = {name: table(v5, sql) for name, sql in KEPT.items()}
    groups = table(v5, COUNTED)
    assert [(g[0], g[2]) for g in groups] == [("HTTP 413: big", 2), ("HTTP 422: odd", 4),
                                              ("HTTP 400: bad", 3)]
    # Read-only before an agent converts it (`outpost dead list`, `outpost status`): from
    # every letter, newest first by the agent's clock too.
    with connect(v5) as db:
        assert [(g["reason"], g["count"], g["oldest"], g["newest"])
                for g in dead.summary(db)["groups"]] == [g[:1] + g[2:5] for g in groups]

    with connect(v5) as db:
        upgrade(db)

    assert table(v5, "PRAGMA user_version") == [(VERSION,)] == [(6,)]
    assert table(v5, "PRAGMA integrity_check") == [("ok",)]
    for name, sql in KEPT.items():
        assert table(v5, sql) == kept[name], name
    # The summary now keeps when each group was dead-lettered by the agent's clock too,
    # and its newest are the newest by it (by the wall clock, the letters made while it
    # read ten years ahead were the newest).
    assert summarised(v5) == groups
    with connect(v5) as db:
        assert dead.summary(db)["count"] == 9
        assert not dead.summary_damaged(db)


def test_a_failure_mid_migration_leaves_the_v5_file_as_it_was(v5: Path) -> None:
    # The columns are added, then a trigger is refused.
    failed_midway_changes_nothing(v5, sqlite3.SQLITE_CREATE_TRIGGER)


async def get(port: int, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def test_an_agent_on_a_v5_spool_shows_its_letters_ages_by_the_time_it_saw_pass(
        make_agent: Any, v5: Path) -> None:
    """Its first start migrates it: the letters made under 1970 are two hours old (the
    agent saw two hours pass since), not 56 years; those made ten years ahead one hour,
    not 0s on top of the newest reasons."""
    agent = await make_agent(spool=v5)
    got = await get(agent.port, "/dead")
    assert [(g["reason"], g["count"]) for g in got["groups"]] == [
        ("HTTP 413: big", 2), ("HTTP 422: odd", 4), ("HTTP 400: bad", 3)]
    ages = [(g["oldest_age_s"], g["newest_age_s"]) for g in got["groups"]]
    assert [(about(lo + HOUR_S, h), about(hi + HOUR_S, h)) for (lo, hi), h in zip(
        ages, (1, 2, 3), strict=True)] == [(True, True)] * 3, ages
    assert [e["id"] for e in got["entries"]] == list(range(3, 12))
    snap = await get(agent.port, "/status")
    assert [g["reason"] for g in snap["dead_reasons"]] == [g["reason"] for g in got["groups"]]


async def test_a_migrated_v5_spool_keeps_its_summary_as_letters_come_and_go(v5: Path) -> None:
    spool = await Spool.open(StorageConfig(path=str(v5)))
    try:
        assert spool.dead_count == 9
        rows = await spool.fetch(spool.streams["app-1"].id, 0, 3)
        await spool.dead_letter([(r.seq, "up", "HTTP 400: bad") for r in rows[:1]])
        assert await dead_live.retry(spool, dead.Which("HTTP 422: odd")) == 4
        assert await dead_live.purge(spool, dead.Which("HTTP 413: big")) == 2
    finally:
        await spool.close()
    assert summarised(v5) == table(v5, COUNTED)
    # The letter dead-lettered now is the group's newest by the agent's clock.
    [(reason, _, count, _, _, first, last)] = summarised(v5)
    assert (reason, count) == ("HTTP 400: bad", 4) and int(str(last)) > int(str(first))


async def test_a_spool_newer_than_the_code_is_still_refused_untouched(v5: Path) -> None:
    with connect(v5) as db:
        upgrade(db)
        db.execute(f"PRAGMA user_version = {VERSION + 1}")
    before = v5.read_bytes()
    with pytest.raises(SpoolTooNew):
        await Spool.open(StorageConfig(path=str(v5)))
    assert v5.read_bytes() == before


async def test_a_v5_spool_whose_compaction_was_cut_short_is_compacted_as_it_migrates(
        v5: Path) -> None:
    """A v0 spool migrated by the v5 code, its VACUUM killed (or refused for room), was left
    at v5 without auto_vacuum: migrated on to v6, it is compacted in the same start, or its
    space was not handed back after a drain until a later start."""
    with connect(v5) as db:
        db.execute("PRAGMA auto_vacuum = NONE")
        db.execute("VACUUM")
    assert table(v5, "PRAGMA auto_vacuum") == [(0,)]
    spool = await Spool.open(StorageConfig(path=str(v5)))
    await spool.close()
    assert table(v5, "PRAGMA user_version") == [(VERSION,)]
    assert table(v5, "PRAGMA auto_vacuum") == [(2,)]
