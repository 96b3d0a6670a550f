"""A commit that SQLite refuses for a reason that is neither the disk nor corruption (a
constraint, here a trigger left in the file) is a storage error like a full disk: each
app gets 503 and Retry-After, the events are counted as rejected_storage_error, and it
is logged at most once a minute: it repeats at every commit, every app's every request."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.segment_helpers import basic, call

REQUESTS = 30


async def test_a_commit_failing_at_every_request_is_logged_once_a_minute(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = await make_agent()
    # A constraint the spool's own code never breaks: every insert of a record fails with
    # an IntegrityError (SQLITE_CONSTRAINT), neither a disk error nor corruption.
    with sqlite3.connect(tmp_path / "spool.db") as conn:
        conn.execute("CREATE TRIGGER no_records BEFORE INSERT ON records "
                     "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    caplog.set_level(logging.ERROR)
    statuses = []
    for i in range(REQUESTS):
        reply = await call(agent.port, "/v1/track", {"userId": "u", "event": "e",
                                                     "messageId": f"m{i}"},
                           headers={"Authorization": basic("k")})
        statuses.append(reply.status)
    assert set(statuses) == {503}, statuses
    failed = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failed) == 1 and "refused by the test" in failed[0], failed
    assert agent.spool.depth == 0
    assert agent.spool.counters.get("rejected_storage_error") == REQUESTS
