"""Damage that garbles a number the spool keeps (a counter, a queue's depth, a record's
lane) into a value of the right type but one no spool can hold: the agent starts, counts
the damage, its queues flow, and every start after it does the same (never a crash loop,
never a queue stuck behind a record no forwarder reads).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.clock import Clock
from agent.families.event import NUCLEUS, Event
from agent.ops.shared_terms import LIST_LIMIT
from agent.settings import StorageConfig
from agent.spool import Spool, migrate_dead
from tests.conftest import free_port, write_config
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import segment_up
from tests.test_codebook import backlog
from tests.waiting import run_outpost, wait_for

INT64_MAX = (1 << 63) - 1
DAY_MS = 86_400_000


def ids(events: list[Event]) -> list[str]:
    return sorted(orjson.loads(ev.body)["messageId"] for ev in events)


async def counters(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/status") as r:
            assert r.status == 200, await r.text()
            return dict((await r.json())["counters"])


def damage(path: Path, *sql: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for statement in sql:
            db.execute(statement)


async def test_counters_at_the_int64_maximum_and_a_salvage_start_every_time(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path) -> None:
    """The counters a salvage adds to (spool_corrupt, dropped_corrupt) and one a commit
    adds to (ingested) garbled to the int64 maximum, and a record's lane garbled, which
    starts a salvage: its counts overflowed the file's integers (OverflowError), the
    salvage failed, and so did every start after it. A count that cannot grow stays at
    the maximum; it is not lost (SQLite turns an overflowing sum into a real number,
    which the next start skipped)."""
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    damage(path, *(f"INSERT OR REPLACE INTO counters(name, value) VALUES ('{name}', {INT64_MAX})"
                   for name in ("ingested", "spool_corrupt", "dropped_corrupt")),
           "UPDATE records SET lane = 'garbage' WHERE id = 1")   # its one event is lost
    up = [segment_up(fake_segment)]
    agent = await make_agent(upstreams=up)
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    assert sorted(fake_segment.message_ids()) == ids(events[1:])
    got = await counters(agent.port)
    assert got["spool_corrupt"] == got["dropped_corrupt"] == got["ingested"] == INT64_MAX
    async with aiohttp.ClientSession() as s:   # a commit adds to ingested: saved, as it can be
        async with s.post(f"http://127.0.0.1:{agent.port}/v1/track",
                          json={"writeKey": "app-1", "event": "e", "userId": "u",
                                "messageId": "after"}) as r:
            assert r.status == 200, await r.text()
    await wait_for(lambda: "after" in fake_segment.message_ids(), timeout=5)
    await agent.stop()
    agent = await make_agent(upstreams=up)
    got = await counters(agent.port)
    assert got["spool_corrupt"] == got["dropped_corrupt"] == got["ingested"] == INT64_MAX
    assert got["acked"] == 100


async def test_a_queue_depth_of_the_int64_maximum_is_damage_not_a_count(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path) -> None:
    """A key's queue depth garbled to the int64 maximum: a number, so the start took it
    for the queue's size (status showed 9.2e18 events queued, and the next commit's sum
    overflowed it), and a salvage took it for the size of the queue it lost (9.2e18
    events dropped_corrupt). No queue holds more events than there are seqs: it is damage,
    the start salvages the file, and the loss it counts is what it read and could not keep
    (here nothing: the records are sound)."""
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    damage(path, f"UPDATE streams SET depth = {INT64_MAX} WHERE id = 1")
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    assert sorted(fake_segment.message_ids()) == ids(events)
    got = await counters(agent.port)
    assert got["spool_corrupt"] == 1 and got.get("dropped_corrupt", 0) == 0, got


@pytest.mark.parametrize(("column", "sign"), [("depth", 1 << 8), ("bytes", 1 << 16)])
async def test_a_negative_queue_depth_or_size_is_damage_not_a_count(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path, column: str,
        sign: int) -> None:
    """A key's queue depth (or size) garbled below zero, as a flipped sign bit leaves it (a
    count is a byte or two in the file: a depth of 50 reads 50 - 256, a size of 12,771
    bytes 12,771 - 65,536). Taken as a count, the depth never came back to 0: the key's
    next event, answered 200, was not sent once the key's loop had ended (its queue read
    as less than none), and status showed a negative queue (of the size: negative bytes).
    It is damage, as a depth past any count is: the start salvages the file, which
    counts the queue again from its records."""
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    damage(path, f"UPDATE streams SET {column} = {column} - {sign} WHERE id = 1")
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute(f"SELECT {column} < 0 FROM streams WHERE id = 1").fetchone() == (1,)
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: sorted(fake_segment.message_ids()) == ids(events), timeout=5)
    async with aiohttp.ClientSession() as s:   # the key's next event
        async with s.post(f"http://127.0.0.1:{agent.port}/v1/track",
                          json={"writeKey": "app-1", "event": "e", "userId": "u",
                                "messageId": "after"}) as r:
            assert r.status == 200, await r.text()
    await wait_for(lambda: "after" in fake_segment.message_ids(), timeout=5)
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
            status = await r.json()
    assert status["queue_depth"] == 0, status
    assert [u["queue_bytes"] for u in status["upstreams"]] == [0], status["upstreams"]
    assert status["counters"]["spool_corrupt"] == 1, status["counters"]
    assert status["counters"].get("dropped_corrupt", 0) == 0, status["counters"]


async def test_a_queue_depth_of_the_int64_maximum_in_a_salvage_is_not_the_loss(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path) -> None:
    """The same depth in a file whose salvage another damage starts (a garbled lane): the
    salvage took the file's depths for the queue's size, and counted 9.2e18 events lost."""
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    # The depths' sum the maximum itself (a sum past it fails in SQLite: unknown).
    damage(path, f"UPDATE streams SET depth = CASE id WHEN 1 THEN {INT64_MAX} ELSE 0 END",
           "UPDATE records SET lane = 'garbage' WHERE id = 1")   # its one event is lost
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    assert sorted(fake_segment.message_ids()) == ids(events[1:])
    got = await counters(agent.port)
    assert got["spool_corrupt"] == 1 and got["dropped_corrupt"] == 1, got


def null_lane(path: Path, rid: int) -> None:
    """Record ``rid``'s lane NULL, as a damaged byte leaves it (its serial type 0: the
    column is NOT NULL, which only SQLite's writes enforce): written through the table's
    definition without NOT NULL, which is then put back as it was."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'records'").fetchone()
        loose = sql.replace("lane INTEGER NOT NULL", "lane INTEGER")
        assert loose != sql, sql
        db.execute("PRAGMA writable_schema = ON")
        db.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'records'", (loose,))
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("UPDATE records SET lane = NULL WHERE id = ?", (rid,))
        db.execute("PRAGMA writable_schema = ON")
        db.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'records'", (sql,))
    with contextlib.closing(sqlite3.connect(path)) as db:
        # (not ``lane IS NULL``: SQLite reads that of a NOT NULL column as false)
        assert db.execute("SELECT count(*) FROM records WHERE typeof(lane) = 'null'"
                          ).fetchone() == (1,)


async def test_a_lane_damaged_to_null_is_found_at_the_start_not_stuck(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path) -> None:
    """A record whose lane reads NULL is in no lane a forwarder reads: counted queued, it
    was never sent, nor dropped, and held its key's status 'queued' for good. The start's
    check of lanes reads three ranges of the lane index, which leave NULL out."""
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    null_lane(path, 1)
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    got = await counters(agent.port)
    assert got["spool_corrupt"] == 1, got
    # The record's one event: sent (its lane taken for normal) or counted lost, not held.
    sent = sorted(fake_segment.message_ids())
    assert len(sent) + got.get("dropped_corrupt", 0) == len(events)
    assert set(ids(events[1:])) <= set(sent)


# A record's key garbled: one record's sign bit flipped (its key's other 49 stay), or
# every record of the key moved to a key id no queue has.
ORPHANED = {"one": "UPDATE records SET stream = stream - 256 WHERE id = (SELECT min(id) "
                   "FROM records WHERE stream = 1)",
            "all": "UPDATE records SET stream = stream + 1024 WHERE stream = 1"}


@pytest.mark.parametrize("which", list(ORPHANED))
async def test_records_whose_key_is_garbled_are_counted_lost_not_silently_gone(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path, which: str) -> None:
    """A record whose key (its stream id) damage garbled into one no queue has: no loop
    reads it, nor does a salvage keep it (there is no key to send it for). Taken as it was,
    its events were never sent nor counted: one of a key's records, and that key showed
    its event queued for good; all of them, and the start forgot the key as one with no
    records, its queue of 50 gone with no count or line. It is damage: the start salvages
    the file, and counts what it could not keep as dropped_corrupt."""
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)   # app-1 (stream 1) and app-2, each event a record
    damage(path, ORPHANED[which])
    lost = 1 if which == "one" else 50
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: len(fake_segment.message_ids()) >= len(events) - lost, timeout=5)
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    got = await counters(agent.port)
    assert got.get("spool_corrupt") == 1, got
    assert got.get("dropped_corrupt") == lost, got
    assert len(fake_segment.message_ids()) == len(events) - lost


async def test_a_record_whose_key_is_garbled_into_a_gap_between_keys_is_counted_lost(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path) -> None:
    """As above, the record's key id garbled into one between two keys' ids (a bit set:
    app-1's 1 read as 513, between it and app-2's 1024), which no queue has: the start's
    check looked at the records' lowest and highest key ids alone. The record's event,
    counted in app-1's queue, was never sent nor counted lost, and app-1 showed it queued
    for good."""
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)   # app-1 (stream 1) and app-2, each event a record
    damage(path, "UPDATE streams SET id = 1024 WHERE id = 2",   # a sound file, ids apart
           "UPDATE records SET stream = 1024 WHERE stream = 2",
           "UPDATE records SET stream = stream + 512 WHERE id = (SELECT min(id) FROM records "
           "WHERE stream = 1)")
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: len(fake_segment.message_ids()) == len(events) - 1, timeout=5)
    got = await counters(agent.port)
    assert got.get("spool_corrupt") == 1 and got.get("dropped_corrupt") == 1, got
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    assert sorted(fake_segment.message_ids()) == ids(events[1:])


async def dead_letters_and_a_queue(path: Path) -> None:
    """Ten dead letters of app1 under two reasons (five each), and three events of app2
    queued."""
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        await spool.append([Event("app1", NUCLEUS, i, b'{"id":%d}' % i, i) for i in range(10)])
        rows = await spool.fetch(spool.streams["app1"].id, 0, 10)
        await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows[:5]])
        await spool.dead_letter([(r.seq, "up", "HTTP 422") for r in rows[5:]])
        await spool.append([Event("app2", NUCLEUS, i, b'{"id":%d}' % i, i)
                            for i in range(10, 13)])
    finally:
        await spool.close()


@pytest.mark.parametrize("action", ["list", "retry"])
async def test_a_dead_letter_whose_key_is_garbled_is_counted_lost_not_hidden(
        make_agent: Any, tmp_path: Path, action: str) -> None:
    """A dead letter's key id garbled into one no key has (a bit set). The listings join
    the letters to their keys: GET /dead counted it and left it out of its entries,
    /dead/{id} answered 404 for it and /dead/export left it out; a retry put it in a
    record of no key's queue, never sent, which the next start's salvage dropped
    uncounted (the queue's depth had never held it). It is damage, as a letter's
    garbled text is: salvaged, that letter lost and counted, the others kept."""
    path = tmp_path / "spool.db"
    await dead_letters_and_a_queue(path)   # ten letters of app1, seqs 1-10; app2's 3 queued
    damage(path, "UPDATE dead SET stream = stream + 512 WHERE seq = 3")
    agent = await make_agent()
    async with aiohttp.ClientSession() as s:
        if action == "list":
            async with s.get(f"http://127.0.0.1:{agent.port}/dead") as r:
                assert r.status == 200, await r.text()
                listed = await r.json()
            assert listed["count"] == 9, listed
            assert sorted(e["id"] for e in listed["entries"]) == [1, 2, 4, 5, 6, 7, 8, 9, 10]
        else:
            async with s.post(f"http://127.0.0.1:{agent.port}/dead/retry",
                              json={"all": True}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["retried"] == 9
            assert agent.spool.depth == 12
    got = await counters(agent.port)
    assert got["spool_corrupt"] == 1 and got["dead_dropped_corrupt"] == 1, got


SUMMARY_DAMAGE = {
    "letters-more": "UPDATE dead_groups SET letters = 7 WHERE reason = 'HTTP 400'",
    "letters-int64-max": f"UPDATE dead_groups SET letters = {INT64_MAX} WHERE reason = 'HTTP 400'",
    "letters-text": "UPDATE dead_groups SET letters = 'garbage' WHERE reason = 'HTTP 400'",
    "times-fewer": "UPDATE dead_times SET n = n - 1 WHERE grp = (SELECT id FROM dead_groups "
                   "WHERE reason = 'HTTP 422')",
    # The totals still agree: the group's times are another's (here, none's).
    "times-elsewhere": "UPDATE dead_times SET grp = 999 WHERE grp = (SELECT id FROM "
                       "dead_groups WHERE reason = 'HTTP 422')",
}


@pytest.mark.parametrize("garble", SUMMARY_DAMAGE.values(), ids=SUMMARY_DAMAGE.keys())
async def test_a_damaged_summary_of_dead_letters_blocks_no_expiry(
        make_agent: Any, tmp_path: Path, clock: Clock, garble: str) -> None:
    """The dead letters' summary (their count by reason, kept by triggers as letters come
    and go) garbled: the triggers' update of it failed the delete of a group's last letter
    (NOT NULL constraint failed: dead_groups.oldest), so expiry failed at every pass, for
    the queue's events too: past max_age_days nothing went, and the spool grew; /dead
    answered 503 (integer overflow), and the letters of that reason could be neither
    retried nor purged. Counted again from the letters at the start, it is right."""
    path = tmp_path / "spool.db"
    await dead_letters_and_a_queue(path)
    damage(path, garble)
    agent = await make_agent(storage={"max_age_days": 1})
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/dead") as r:
            assert r.status == 200, await r.text()
            listed = await r.json()
    assert listed["count"] == 10
    assert sorted((g["reason"], g["count"]) for g in listed["groups"]) == [
        ("HTTP 400", 5), ("HTTP 422", 5)]
    clock.passed_ms = clock.wall_shift_ms = 2 * DAY_MS
    await agent.spool.prune()
    assert agent.spool.depth == 0 and agent.spool.dead_count == 0
    got = await counters(agent.port)
    assert got["expired"] == 3 and got["dead_expired"] == 10, got
    assert agent.spool.expiry_errors == 0


@pytest.mark.parametrize("action", ["retry", "purge"])
@pytest.mark.parametrize("garble", SUMMARY_DAMAGE.values(), ids=SUMMARY_DAMAGE.keys())
async def test_a_stopped_agent_s_dead_letters_are_retried_or_purged_past_a_damaged_summary(
        tmp_path: Path, garble: str, action: str) -> None:
    """`outpost dead retry|purge --reason` on a stopped agent's spool whose summary damage
    garbled: it failed ('cannot read the spool ...: NOT NULL constraint failed:
    dead_groups.oldest'), as the agent's own deletes did, until the agent was started."""
    path = tmp_path / "spool.db"
    await dead_letters_and_a_queue(path)
    damage(path, garble)
    cfg = write_config(tmp_path / "agent.toml", path, port=free_port())
    for reason in ("HTTP 400", "HTTP 422"):
        code, text = await run_outpost("dead", action, "--reason", reason, "--config", str(cfg))
        assert code == 0, text
        assert f"{'re-queued' if action == 'retry' else 'purged'} 5 dead letters" in text, text
        # Said once: the first command counted it again.
        assert ("disagreed with them (damage)" in text) == (reason == "HTTP 400"), text
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM dead").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM dead_groups").fetchone() == (0,)
        assert db.execute("SELECT sum(live) FROM records").fetchone()[0] == (
            3 if action == "purge" else 13)


@pytest.mark.parametrize("garble", SUMMARY_DAMAGE.values(), ids=SUMMARY_DAMAGE.keys())
async def test_a_stopped_agent_s_dead_letters_are_listed_past_a_damaged_summary(
        tmp_path: Path, garble: str) -> None:
    """`outpost dead list` on a stopped agent's spool whose summary damage garbled: the
    retry and purge count it again (Offline), but the listing read it as it was, read-only:
    a count past the int64 maximum failed it ('cannot read the spool ...: integer
    overflow'), others listed letters that are not there. It lists the letters."""
    path = tmp_path / "spool.db"
    await dead_letters_and_a_queue(path)
    damage(path, garble)
    cfg = write_config(tmp_path / "agent.toml", path, port=free_port())
    code, text = await run_outpost("dead", "list", "--json", "--config", str(cfg))
    assert code == 0, text
    listed = orjson.loads(text[text.index("{"):])
    assert listed["count"] == 10, listed
    assert sorted((g["reason"], g["count"]) for g in listed["groups"]) == [
        ("HTTP 400", 5), ("HTTP 422", 5)], listed
    assert listed["reasons"] == 2, listed
    for reason in ("HTTP 400", "HTTP 422"):
        code, text = await run_outpost("dead", "list", "--json", "--reason", reason,
                                       "--config", str(cfg))
        assert code == 0, text
        assert orjson.loads(text[text.index("{"):])["of_reason"] == 5, text


# Damage the sums cannot see: a group's first or last time garbled, its counts right.
TIME_DAMAGE = {
    "oldest-1970": "UPDATE dead_groups SET oldest = 0 WHERE reason = 'HTTP 400'",
    "oldest-1ms-later": "UPDATE dead_groups SET oldest = oldest + 1 WHERE reason = 'HTTP 400'",
    "newest-a-year-later": "UPDATE dead_groups SET newest = newest + 31536000000 "
                           "WHERE reason = 'HTTP 422'",
}


def letters_times(path: Path) -> list[tuple[str, int, int]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT reason, min(at), max(at) FROM dead GROUP BY reason "
                          "ORDER BY reason").fetchall()


@pytest.mark.parametrize("garble", TIME_DAMAGE.values(), ids=TIME_DAMAGE.keys())
async def test_a_garbled_time_of_the_dead_letters_summary_is_not_listed(
        make_agent: Any, tmp_path: Path, garble: str) -> None:
    """A group's `oldest` or `newest` garbled, its counts right: the check by sums saw
    nothing, and `outpost dead list` (the stopped agent's, and the running one's) showed
    the garbled time, or ordered the groups by it, until the group's next change."""
    path = tmp_path / "spool.db"
    await dead_letters_and_a_queue(path)
    want = letters_times(path)
    damage(path, garble)
    cfg = write_config(tmp_path / "agent.toml", path, port=free_port())
    code, text = await run_outpost("dead", "list", "--json", "--config", str(cfg))
    assert code == 0, text
    assert "disagrees with them (damage)" in text, text
    listed = orjson.loads(text[text.index("{"):])
    assert sorted((g["reason"], g["oldest"], g["newest"]) for g in listed["groups"]) == want
    agent = await make_agent()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/dead") as r:
            assert r.status == 200, await r.text()
            listed = await r.json()
    assert sorted((g["reason"], g["oldest"], g["newest"]) for g in listed["groups"]) == want
    await agent.stop()
    with contextlib.closing(sqlite3.connect(path)) as db:   # counted again in the file
        assert db.execute("SELECT reason, oldest, newest FROM dead_groups "
                          "ORDER BY reason").fetchall() == want


def test_every_group_a_listing_shows_has_its_times_checked() -> None:
    assert migrate_dead.CHECKED_GROUPS >= LIST_LIMIT
