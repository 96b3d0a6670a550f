"""The loop hands each small commit to the spool's thread and waits for its COMMIT to
start (writer.HAND_OVER_S at most, spool/db.py Signal). Commits that fail before their
COMMIT, many at once, leave no wait behind: every request is answered, /healthz too,
and once the cause is gone every request is stored."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from tests.segment_helpers import basic, call

AT_ONCE = 40


async def _round(port: int, tag: str) -> list[int]:
    async def one(i: int) -> int:
        reply = await call(port, "/v1/track", {"userId": "u", "event": "e",
                                               "messageId": f"{tag}{i}"},
                           headers={"Authorization": basic("k")})
        return reply.status

    async def healthz() -> int:
        return (await call(port, "/healthz", method="GET")).status

    *stores, health = await asyncio.gather(*(one(i) for i in range(AT_ONCE)), healthz())
    assert health == 200
    return stores


async def test_commits_failing_before_their_commit_many_at_once_leave_no_wait_behind(
        make_agent: Any, tmp_path: Path) -> None:
    agent = await make_agent()
    with sqlite3.connect(tmp_path / "spool.db") as conn:
        conn.execute("CREATE TRIGGER no_records BEFORE INSERT ON records "
                     "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    for turn in range(3):
        assert set(await _round(agent.port, f"f{turn}-")) == {503}
    with sqlite3.connect(tmp_path / "spool.db") as conn:
        conn.execute("DROP TRIGGER no_records")
    for turn in range(3):
        assert set(await _round(agent.port, f"s{turn}-")) == {200}
    assert agent.spool.depth == 3 * AT_ONCE
    assert agent.spool.counters.get("rejected_storage_error") == 3 * AT_ONCE
