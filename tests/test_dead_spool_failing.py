"""`outpost dead` against a running agent whose spool fails (a damaged table here; an I/O
error on a failing card does the same): one line saying the spool failed, and the log
says so too, rather than "not an Outpost agent" from a bare 500."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.ops.shared_terms import EXPORT_PAGE
from tests.conftest import free_port
from tests.test_salvage import DEAD, damage_dead_letters
from tests.waiting import run_outpost


@pytest.mark.parametrize("args", [["list"], ["show", "1"], ["retry", "--all"],
                                  ["purge", "--all"], ["export", "EXPORT"]])
async def test_dead_letter_commands_on_a_failing_spool_say_so_in_one_line(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        args: list[str]) -> None:
    agent = await make_agent(port=free_port())
    with contextlib.closing(sqlite3.connect(str(agent.spool.path),
                                            isolation_level=None)) as other:
        other.execute("DROP TABLE dead")
    args = [str(tmp_path / "out.jsonl") if a == "EXPORT" else a for a in args]
    code, out = await run_outpost("dead", *args, "--config", agent.config_path)
    assert code == 1, out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert "not an Outpost agent" not in out, out
    assert "spool" in out and "no such table: dead" in out, out
    assert any("dead-letter" in r.getMessage() and "no such table: dead" in r.getMessage()
               and r.levelno >= logging.ERROR for r in caplog.records)


async def test_an_export_the_agent_cuts_short_keeps_the_old_file_and_says_so(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The spool fails after the export's first page went out: a row the second page reads
    is damage (text that is not UTF-8), met while no fresh spool can be made to salvage it
    into (the spool's directory removed under the agent, and a file now has its name; a
    full or read-only disk does the same, but needs a mount). The spool stays closed and
    the stream ends without its last chunk. The command says the agent stopped the export
    and that the file is unchanged, in one line; the log says why."""
    store = tmp_path / "store"
    agent = await make_agent(port=free_port(), spool=store / "spool.db")
    letters = EXPORT_PAGE + 5
    await agent.spool.append([Event("app", NUCLEUS, dedupe_key("app", n), b'{"n":%d}' % n)
                              for n in range(letters)])
    rows = await agent.spool.fetch(agent.spool.streams["app"].id, 0, letters)
    await agent.spool.dead_letter([(r.seq, "up", "refused") for r in rows])
    with contextlib.closing(sqlite3.connect(str(agent.spool.path),
                                            isolation_level=None)) as other:
        other.execute("UPDATE dead SET reason = CAST(CAST(reason AS BLOB) || x'ff' AS TEXT) "
                      "WHERE seq = (SELECT max(seq) FROM dead)")
    # Read on through the files the agent has open, until the damage: its recovery then
    # cannot make a fresh spool where a file has the directory's name.
    shutil.rmtree(store)
    store.write_text("")
    target = tmp_path / "out.jsonl"
    target.write_text("kept\n")
    code, out = await run_outpost("dead", "export", str(target), "--config", agent.config_path)
    assert code == 1, out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert f"after {EXPORT_PAGE} dead letters" in out and "unchanged" in out, out
    assert target.read_text() == "kept\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.jsonl.")]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("export" in m and "the spool is not open" in m for m in said), said
    assert any(f"File exists: '{store}'" in m for m in said), said   # why it stays closed


@pytest.mark.parametrize("action", ["retry", "purge"])
async def test_a_retry_or_purge_meeting_damage_salvages_the_spool_and_goes_on(
        make_agent: Any, action: str) -> None:
    """A page of dead letters destroyed: a retry or a purge is a commit, and damage a
    commit meets moves the spool aside and salvages it (docs/operations.md, Corrupt
    spool). They failed instead, at every try, until expiry or a restart met the damage:
    the operator could neither retry nor purge a single letter."""
    agent = await make_agent(port=free_port())
    spool = agent.spool
    await damage_dead_letters(spool)
    code, out = await run_outpost("dead", action, "--all", "--config", agent.config_path)
    assert code == 0, out
    assert spool.counters.get("spool_corrupt") == 1
    done = spool.counters.get("dead_retried" if action == "retry" else "dead_purged", 0)
    lost = spool.counters.get("dead_dropped_corrupt", 0)
    assert 0 < lost < DEAD and done + lost == DEAD and spool.dead_count == 0
    assert spool.depth == (done if action == "retry" else 0)
