"""Offline reads (`outpost status`, `outpost dead list`) of a spool reached through a
symlink, or while an agent starts on it, or two at once: the -wal and -shm the reads make
are removed only while nothing else has the spool open (spool/as_found.py), and nothing
of the spool is ever lost: the agent then starts, and every event is still there."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

from tests.conftest import free_port, write_config
from tests.fakes.ops_scene import post_events
from tests.test_dead_letters import _beside, _stopped_with_three_letters
from tests.waiting import ROOT, run_outpost

READS = (("status",), "3 kept"), (("dead", "list"), "3 dead letters")


async def test_reads_of_a_symlinked_spool_leave_its_files_and_the_agent_finds_them_all(
        make_agent: Any, tmp_path: Path) -> None:
    """SQLite makes the -wal and -shm beside the file the link names: removed there, and
    nothing made beside the link."""
    _, real = await _stopped_with_three_letters(make_agent)
    found = _beside(real)
    links = tmp_path / "links"
    links.mkdir(mode=0o700)
    link = links / "spool.db"
    link.symlink_to(real)
    cfg = str(write_config(tmp_path / "linked.toml", link, port=free_port()))
    for command, says in READS:
        got, text = await run_outpost(*command, "--config", cfg)
        assert got == 0 and says in text, (command, text)
        assert _beside(real) == found, command
        assert os.listdir(links) == ["spool.db"], command
    agent = await make_agent(spool=link, port=free_port())
    got, text = await run_outpost("dead", "list", "--config", agent.config_path)
    assert got == 0 and "3 dead letters" in text, text


async def _paused_read(spool: Path, again: bool) -> asyncio.subprocess.Process:
    """A real process reading ``spool``'s dead letters under ``as_found``, paused with its
    connection open once it has printed their count (3, checked here) until a line comes on
    its stdin; then (``again``) it prints the count again, closes and prints "done"."""
    reader = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys\n"
        "from pathlib import Path\n"
        "from agent.spool import dead\n"
        "from agent.spool.as_found import as_found\n"
        "spool = Path(sys.argv[1])\n"
        "with as_found(spool):\n"
        "    conn = dead.read_only(spool)\n"
        "    print(dead.summary(conn, 1)['count'], flush=True)\n"
        "    sys.stdin.readline()\n"
        "    if sys.argv[2]:\n"
        "        print(dead.summary(conn, 1)['count'], flush=True)\n"
        "    conn.close()\n"
        "print('done', flush=True)\n", str(spool), "again" if again else "", cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert reader.stdout is not None
    assert await asyncio.wait_for(reader.stdout.readline(), 10) == b"3\n"
    return reader


async def test_a_read_an_agent_starts_beside_leaves_the_agents_files_and_loses_nothing(
        make_agent: Any, tmp_path: Path) -> None:
    """An offline read (a real process, paused with its connection open) made the -wal
    and -shm; an agent starts on the spool meanwhile and stores events in them. As the
    read ends, they are the agent's: kept, and the agent stores on; another read at once
    changes nothing either. Every event and dead letter is there when the agent starts
    again."""
    _, spool = await _stopped_with_three_letters(make_agent)
    reader = await _paused_read(spool, again=True)
    assert reader.stdin is not None and reader.stdout is not None
    try:
        made = {f"{spool.name}-wal", f"{spool.name}-shm"}
        assert made <= set(os.listdir(spool.parent))
        agent = await make_agent(spool=spool, port=free_port())
        await post_events(agent.port, "app-b", range(20))
        cfg = str(write_config(tmp_path / "reads.toml", spool, port=free_port()))
        got, text = await run_outpost("dead", "list", "--config", cfg)   # not where it listens
        assert got == 0 and "3 dead letters" in text, text
        reader.stdin.write(b"\n")
        assert await asyncio.wait_for(reader.stdout.read(), 10) == b"3\ndone\n"
    finally:
        reader.stdin.close()
        await asyncio.wait_for(reader.wait(), 10)
    assert reader.returncode == 0
    assert made <= set(os.listdir(spool.parent))
    await post_events(agent.port, "app-b", range(20, 40))
    assert agent.spool.streams["app-b"].depth == 40
    await agent.stop()
    again = await make_agent(spool=spool, port=free_port())
    assert again.spool.streams["app-b"].depth == 40
    got, text = await run_outpost("dead", "list", "--config", again.config_path)
    assert got == 0 and "3 dead letters" in text, text


async def test_a_read_keeps_the_commits_a_killed_writer_left_in_the_wal_it_made(
        make_agent: Any, tmp_path: Path) -> None:
    """The read made the -wal; a writer (as an agent) commits in it and is killed before
    the read ends, its -wal never checkpointed: kept as the read ends, its commit seen by
    the next read and by the agent that starts."""
    _, spool = await _stopped_with_three_letters(make_agent)
    reader = await _paused_read(spool, again=False)
    assert reader.stdin is not None and reader.stdout is not None
    try:
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sqlite3, sys\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('PRAGMA wal_autocheckpoint=0')\n"
            "db.execute('DELETE FROM dead WHERE rowid = (SELECT max(rowid) FROM dead)')\n"
            "print('committed', flush=True)\n"
            "sys.stdin.readline()\n", str(spool),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert writer.stdout is not None
        assert await asyncio.wait_for(writer.stdout.readline(), 10) == b"committed\n"
        writer.kill()
        await asyncio.wait_for(writer.wait(), 10)
        reader.stdin.write(b"\n")
        assert await asyncio.wait_for(reader.stdout.read(), 10) == b"done\n"
    finally:
        reader.stdin.close()
        await asyncio.wait_for(reader.wait(), 10)
    assert os.path.getsize(f"{spool}-wal") > 0
    cfg = str(write_config(tmp_path / "reads.toml", spool, port=free_port()))
    got, text = await run_outpost("dead", "list", "--config", cfg)
    assert got == 0 and "2 dead letters" in text, text
    agent = await make_agent(spool=spool, port=free_port())
    got, text = await run_outpost("dead", "list", "--config", agent.config_path)
    assert got == 0 and "2 dead letters" in text, text


async def test_a_read_that_fails_midway_says_why_and_leaves_the_files_as_found(
        make_agent: Any, tmp_path: Path) -> None:
    """The spool opens, then a query fails (a table gone): each read says it could not
    read the spool, in one line, and still removes the -wal and -shm it made."""
    _, spool = await _stopped_with_three_letters(make_agent)
    with contextlib.closing(sqlite3.connect(spool, isolation_level=None)) as db:
        db.execute("DROP TABLE dead")
    found = _beside(spool)
    cfg = str(write_config(tmp_path / "reads.toml", spool, port=free_port()))
    for command in (("status",), ("dead", "list"), ("dead", "export", str(tmp_path / "x"))):
        got, text = await run_outpost(*command, "--config", cfg)
        assert got == 1 and "cannot read the spool" in text, (command, text)
        assert "no such table: dead" in text and "Traceback" not in text, (command, text)
        assert _beside(spool) == found, command
