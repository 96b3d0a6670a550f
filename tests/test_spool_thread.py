"""The spool's database thread (agent/spool/db.py SqliteThread), on real SQLite files:
calls run in order and answer their caller, close drains, and nothing runs after it."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.spool.db import SqliteThread, fetch_all
from tests.waiting import ROOT

SCHEMA = "CREATE TABLE IF NOT EXISTS t(n INTEGER);"


def insert(conn: sqlite3.Connection, n: int) -> int:
    conn.execute("INSERT INTO t(n) VALUES (?)", (n,))
    return n


def fail(conn: sqlite3.Connection) -> None:
    raise ValueError("not this one")


def rows(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [n for (n,) in conn.execute("SELECT n FROM t ORDER BY rowid")]


async def opened(path: Path) -> SqliteThread:
    db = SqliteThread("spool-test")
    await db.open(path, SCHEMA)
    return db


async def test_a_call_that_fails_raises_in_its_caller_and_the_next_call_runs(
        tmp_path: Path) -> None:
    db = await opened(tmp_path / "t.db")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await db.run(fetch_all, "SELECT * FROM missing")
    with pytest.raises(ValueError, match="not this one"):
        await db.run(fail)
    assert await db.run(insert, 7) == 7
    await db.close()
    assert rows(tmp_path / "t.db") == [7]


async def test_close_runs_every_call_queued_before_it_then_ends_its_thread(
        tmp_path: Path) -> None:
    db = await opened(tmp_path / "t.db")
    [thread] = [t for t in threading.enumerate() if t.name == "spool-test"]
    queued = [db.run(insert, n) for n in range(50)]
    await db.close()
    assert [fut.result() for fut in queued] == list(range(50))
    assert not thread.is_alive()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        await db.run(insert, 50)
    assert rows(tmp_path / "t.db") == list(range(50))


async def test_a_call_cancelled_before_its_turn_is_not_run(tmp_path: Path) -> None:
    db = await opened(tmp_path / "t.db")
    release = threading.Event()
    held = db.run(lambda conn: release.wait(30))  # bounded: the thread is freed below
    cancelled = db.run(insert, 1)
    cancelled.cancel()
    release.set()
    assert await held
    assert await db.run(insert, 2) == 2
    await db.close()
    assert rows(tmp_path / "t.db") == [2]


def test_a_thread_never_closed_does_not_hold_the_process_at_exit(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from agent.spool.db import SqliteThread\n"
        "async def main():\n"
        "    db = SqliteThread('spool-left-open')\n"
        f"    await db.open(Path(sys.argv[1]), {SCHEMA!r})\n"
        "asyncio.run(main())\n"
        "print('done')\n")
    # The bound only keeps a hang from stalling the suite: a thread that held the exit
    # would never let the process end.
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "t.db")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "done\n", done.stderr


async def test_a_thread_whose_open_failed_ends_at_close(tmp_path: Path) -> None:
    db = SqliteThread("spool-test-bad")
    with pytest.raises(sqlite3.OperationalError):
        await db.open(tmp_path / "t.db", "NOT SQL;")
    [thread] = [t for t in threading.enumerate() if t.name == "spool-test-bad"]
    await db.close()
    assert not thread.is_alive()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        await db.run(insert, 1)



# hand_over blocks the event loop: it must end as soon as the thread has the call, and not
# wait at all behind an earlier call. Each call below holds until the test releases it, for
# at most half hand_over's bound: its wait answers True only if the test released it, which
# it does once hand_over has returned, so hand_over ended while the call still held, not on
# its bound nor on the call's end (no clock read: a loaded machine only delays both).
HAND_OVER_BOUND_S = 30.0
CALL_HOLDS_S = HAND_OVER_BOUND_S / 2


async def test_hand_over_ends_once_an_idle_thread_takes_the_call(tmp_path: Path) -> None:
    db = await opened(tmp_path / "t.db")
    release = threading.Event()
    held = db.run(lambda conn: release.wait(CALL_HOLDS_S))
    db.hand_over(HAND_OVER_BOUND_S)
    release.set()
    assert await held, "hand_over waited until the call it handed over ended"
    assert await db.run(insert, 1) == 1   # the next call is handed over and answered too
    await db.close()
    assert rows(tmp_path / "t.db") == [1]


async def test_hand_over_does_not_wait_behind_a_call_in_progress(tmp_path: Path) -> None:
    db = await opened(tmp_path / "t.db")
    release, running = threading.Event(), threading.Event()

    def busy(conn: sqlite3.Connection) -> bool:
        running.set()
        return release.wait(CALL_HOLDS_S)

    held = db.run(busy)
    assert running.wait(HAND_OVER_BOUND_S)
    queued = db.run(insert, 2)
    db.hand_over(HAND_OVER_BOUND_S)   # the thread is busy: the call waits its turn, not the loop
    release.set()
    assert await held, "hand_over waited behind the call in progress"
    assert await queued == 2
    await db.close()
    assert rows(tmp_path / "t.db") == [2]


async def test_hand_over_until_ends_when_the_call_sets_it_while_it_still_runs(
        tmp_path: Path) -> None:
    db = await opened(tmp_path / "t.db")
    reached, release = threading.Event(), threading.Event()

    def two_halves(conn: sqlite3.Connection) -> bool:
        insert(conn, 3)
        reached.set()      # as a group commit does when its COMMIT starts
        return release.wait(CALL_HOLDS_S)

    held = db.run(two_halves)
    db.hand_over(HAND_OVER_BOUND_S, reached)
    assert reached.is_set() and not held.done()
    release.set()
    assert await held, "hand_over waited for the call's end, not for `until`"
    await db.close()
    assert rows(tmp_path / "t.db") == [3]
