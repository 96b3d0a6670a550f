"""Damage that leaves bytes which are not UTF-8 in a TEXT column of the spool (a key, a
counter's name, a dead letter's reason): Python's sqlite3 refuses to read such a value
("Could not decode to UTF-8 column ..."). It is damage, as a malformed page is: the file
is moved aside and salvaged, what is readable kept, the rest counted. Never a spool left
closed for good, nor a dead-letter listing refused at every request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import segment_up
from tests.test_codebook import backlog
from tests.test_spool_damage_numbers import counters, damage, dead_letters_and_a_queue, ids
from tests.waiting import wait_for

NOT_UTF8 = "CAST(x'ff61' AS TEXT)"   # a text value whose first byte no UTF-8 text holds

# What the start reads: a key (app-1's 50 events have no key left to be sent for), and a
# counter's name (nothing lost; the other counters kept).
AT_START = {"key": (f"UPDATE streams SET key = {NOT_UTF8} WHERE key = 'app-1'", 50),
            "counter": (f"INSERT INTO counters(name, value) VALUES ({NOT_UTF8}, 7)", 0)}


@pytest.mark.parametrize("which", list(AT_START))
async def test_text_that_is_not_utf8_found_at_the_start_is_salvaged_not_a_closed_spool(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path, which: str) -> None:
    """The start's read of the keys or counters failed, taken for a disk error: the spool
    stayed closed, every app was answered 503 and nothing queued was sent, at every try
    to open it again, for good."""
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)   # app-1 and app-2, 50 each
    sql, lost = AT_START[which]
    damage(path, sql)
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    assert agent.spool.open_error is None
    await wait_for(lambda: len(fake_segment.message_ids()) == len(events) - lost, timeout=5)
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    kept = [ev for ev in events if not lost or ev.key != "app-1"]
    assert sorted(fake_segment.message_ids()) == ids(kept)
    got = await counters(agent.port)
    assert got["spool_corrupt"] == 1 and got.get("dropped_corrupt", 0) == lost, got
    assert got["ingested"] == 100, got   # the file's counters, past the garbled one
    async with aiohttp.ClientSession() as s:   # apps are taken again
        async with s.post(f"http://127.0.0.1:{agent.port}/v1/track",
                          json={"writeKey": "app-1", "event": "e", "userId": "u",
                                "messageId": "after"}) as r:
            assert r.status == 200, await r.text()
    await wait_for(lambda: "after" in fake_segment.message_ids(), timeout=5)


@pytest.mark.parametrize("column", ["reason", "upstream"])
async def test_a_dead_letter_s_text_that_is_not_utf8_is_salvaged_when_listed(
        make_agent: Any, tmp_path: Path, column: str) -> None:
    """One dead letter's reason (or upstream) garbled while the agent runs: no start reads
    it, and GET /dead, /dead/{id} and /dead/export answered 503 at every request (the
    read's error not taken for damage), the letters neither listed nor exported until
    someone purged them. The read that meets it has the spool salvaged: that letter lost
    and counted, the others listed."""
    path = tmp_path / "spool.db"
    await dead_letters_and_a_queue(path)   # ten letters of app1, seqs 1-10
    agent = await make_agent()
    damage(path, f"UPDATE dead SET {column} = {NOT_UTF8} WHERE seq = 3")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/dead") as r:
            assert r.status == 200, await r.text()
            listed = await r.json()
        assert listed["count"] == 9, listed
        assert sorted(e["id"] for e in listed["entries"]) == [1, 2, 4, 5, 6, 7, 8, 9, 10]
        async with s.get(f"http://127.0.0.1:{agent.port}/dead/export") as r:
            assert r.status == 200, await r.text()
            exported = [orjson.loads(line) for line in (await r.read()).splitlines()]
        assert [e["id"] for e in exported] == [1, 2, 4, 5, 6, 7, 8, 9, 10]
        async with s.get(f"http://127.0.0.1:{agent.port}/dead/3") as r:
            assert r.status == 404, await r.text()
    got = await counters(agent.port)
    assert got["spool_corrupt"] == 1 and got["dead_dropped_corrupt"] == 1, got
    assert agent.spool.depth == 3   # the queue kept
