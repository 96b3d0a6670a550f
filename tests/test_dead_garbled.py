"""`outpost dead list|show|export` on a dead letter (or its key) that damage garbled into
another type, which SQLite reads back without complaint (the tables are not STRICT)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, write_config
from tests.test_status_cli import garbled_spool
from tests.waiting import run_outpost

GARBLES = {"reason": "UPDATE dead SET reason = x'ff'",
           "upstream": "UPDATE dead SET upstream = x'ff'",
           "time": "UPDATE dead SET at = 'x'",
           "body": "UPDATE dead SET body = 5",
           "key": "UPDATE streams SET key = x'ff'"}


def _reads(tmp_path: Path) -> tuple[tuple[str, ...], ...]:
    return (("list",), ("list", "--json"), ("show", "1"),
            ("export", str(tmp_path / "out.jsonl")), ("export", "-"))


@pytest.mark.parametrize("garble", GARBLES.values(), ids=GARBLES.keys())
async def test_a_stopped_agent_s_garbled_dead_letter_is_said_damaged_in_one_line(
        tmp_path: Path, garble: str) -> None:
    """No agent running: `outpost dead show` and `export` printed a TypeError (or
    AttributeError) traceback, and `dead list` said the spool's letters came from "not
    an Outpost agent" at the agent's address. The spool is damaged: said in one line, as
    `outpost status` says it, exit 1."""
    path = await garbled_spool(tmp_path, garble)
    cfg = write_config(tmp_path / "agent.toml", path, port=free_port())
    for args in _reads(tmp_path):
        code, out = await run_outpost("dead", *args, "--config", str(cfg))
        assert "Traceback" not in out and "not an Outpost agent" not in out, (args, out)
        assert code == 1 and len(out.strip().splitlines()) == 1, (args, out)
        assert "damaged" in out and str(path) in out and "start the agent" in out, (args, out)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("garble", [g for name, g in GARBLES.items() if name != "key"],
                         ids=[name for name in GARBLES if name != "key"])
async def test_a_running_agent_s_garbled_dead_letter_is_salvaged_and_the_rest_listed(
        make_agent: Any, tmp_path: Path, garble: str) -> None:
    """A running agent (whose start reads no dead letter) answered every /dead with a 500,
    which `outpost dead` took for "not an Outpost agent": damage a dead-letter read meets
    moves the spool aside and salvages it, and the read goes on (docs/operations.md,
    Corrupt spool); the garbled letter is counted lost."""
    path = await garbled_spool(tmp_path, garble)
    agent = await make_agent(port=free_port(), spool=path, upstreams=[])
    code, out = await run_outpost("dead", "list", "--config", agent.config_path)
    assert code == 0 and "0 dead letters" in out, out
    assert agent.spool.counters.get("spool_corrupt") == 1
    assert agent.spool.counters.get("dead_dropped_corrupt") == 1
    assert agent.spool.depth == 2
    for args in _reads(tmp_path)[1:]:
        code, out = await run_outpost("dead", *args, "--config", agent.config_path)
        assert "Traceback" not in out and "not an Outpost agent" not in out, (args, out)


# A dead letter's columns a retry copies into the queue, garbled.
RETRY_GARBLES = {"body-text": "UPDATE dead SET body = 'text'",
                 "body-number": "UPDATE dead SET body = 5",
                 "dedupe-key": "UPDATE dead SET dkey = 'x'",
                 "stream": "UPDATE dead SET stream = 'x'",
                 "received": "UPDATE dead SET received = 'x'"}


@pytest.mark.parametrize("garble", RETRY_GARBLES.values(), ids=RETRY_GARBLES.keys())
async def test_a_stopped_agent_s_retry_of_a_garbled_dead_letter_is_refused_as_damage(
        tmp_path: Path, garble: str) -> None:
    """`outpost dead retry` with no agent running printed a TypeError traceback (a body of
    text, a dedupe key of text), or queued the letter as it was: a body that was the
    number 5 went back as five NUL bytes, to be sent upstream, and a stream or receipt
    time of text went into the queue's records. It says the spool is damaged, in one line,
    and changes nothing."""
    path = await garbled_spool(tmp_path, garble)
    with contextlib.closing(sqlite3.connect(path)) as db:
        before = db.execute("SELECT * FROM dead").fetchall(), db.execute(
            "SELECT count(*) FROM records").fetchone()
    cfg = write_config(tmp_path / "agent.toml", path, port=free_port())
    code, out = await run_outpost("dead", "retry", "--all", "--config", str(cfg))
    assert "Traceback" not in out and code == 1 and len(out.strip().splitlines()) == 1, out
    assert "damaged" in out and str(path) in out and "start the agent" in out, out
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert (db.execute("SELECT * FROM dead").fetchall(), db.execute(
            "SELECT count(*) FROM records").fetchone()) == before


@pytest.mark.parametrize("garble", RETRY_GARBLES.values(), ids=RETRY_GARBLES.keys())
async def test_a_running_agent_s_retry_of_a_garbled_dead_letter_salvages_the_spool(
        make_agent: Any, tmp_path: Path, garble: str) -> None:
    """A running agent's retry failed with a 500 (taken for "not an Outpost agent"), or
    queued the garbled letter as it was. Damage a retry meets moves the spool aside and
    salvages it, and the retry goes on (docs/operations.md, Corrupt spool): the garbled
    letter is counted lost, never queued."""
    path = await garbled_spool(tmp_path, garble)
    agent = await make_agent(port=free_port(), spool=path, upstreams=[])
    code, out = await run_outpost("dead", "retry", "--all", "--config", agent.config_path)
    assert code == 0 and "re-queued 0 dead letters" in out, out
    assert agent.spool.counters.get("spool_corrupt") == 1
    assert agent.spool.counters.get("dead_dropped_corrupt") == 1
    assert agent.spool.depth == 2 and agent.spool.dead_count == 0
