"""Offline reads (`outpost status`, `outpost dead list`) of a spool reached through a
symlink, or while an agent starts on it, or two at once: the -wal and -shm the reads make
are removed only while nothing else has the spool open (spool/as_found.py), and nothing
of the spool is ever lost: the agent then starts, and every event is still there."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from tests.conftest import free_port, write_config
from tests.fakes.ops_scene import post_events
from tests.test_dead_letters import _beside, _stopped_with_three_letters
from tests.waiting import run_outpost

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


async def test_reads_while_an_agent_starts_on_the_spool_lose_nothing(
        make_agent: Any, tmp_path: Path) -> None:
    """Reads run, two and more at once, while the agent starts on the spool and stores
    events: each read answers, the agent starts, and every event is there, queued,
    while it runs and after it stops."""
    _, spool = await _stopped_with_three_letters(make_agent)
    port = free_port()
    cfg = str(write_config(tmp_path / "reads.toml", spool, port=port))

    async def reads() -> None:
        for _ in range(3):
            results = await asyncio.gather(*(run_outpost("status", "--config", cfg)
                                             for _ in range(3)))
            assert all(got == 0 for got, _ in results), results

    reading = asyncio.ensure_future(reads())
    agent = await make_agent(spool=spool, port=port)
    await post_events(agent.port, "app-b", range(20))
    await reading
    assert agent.spool.streams["app-b"].depth == 20
    await agent.stop()
    for command, says in READS:
        got, text = await run_outpost(*command, "--config", cfg)
        assert got == 0 and says in text, (command, text)
    got, text = await run_outpost("status", "--json", "--config", cfg)
    assert got == 0 and '"dead_letters": 3' in text, text
    again = await make_agent(spool=spool, port=free_port())
    assert again.spool.streams["app-b"].depth == 20
