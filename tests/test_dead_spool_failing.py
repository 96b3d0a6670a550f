"""`outpost dead` against a running agent whose spool fails (a damaged table here; an I/O
error on a failing card does the same): one line saying the spool failed, and the log
says so too, rather than "not an Outpost agent" from a bare 500."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
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
