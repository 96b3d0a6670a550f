"""A full disk must not flood the log: one "spool commit failed" line per interval, while
every refused event is still counted."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import logs
from tests.test_disk import event, fill_up, post, small_fs  # noqa: F401  (small_fs: a fixture)

BURST = 40


async def test_a_full_disk_logs_one_line_per_interval_and_counts_every_rejection(
        make_agent: Any, small_fs: Path, caplog: pytest.LogCaptureFixture,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    (small_fs / "filler").write_bytes(b"\0" * 700_000)
    agent = await make_agent(spool=small_fs / "spool" / "spool.db", storage={"max_size_mb": 64})
    async with aiohttp.ClientSession() as s:
        for n in range(400):                          # fill the disk
            r = await post(s, agent.port, [event(n * 10 + j) for j in range(10)])
            if r.status == 503:
                break
            assert r.status == 200
        assert r.status == 503, "the disk never filled"
        # Take the last free blocks too: SQLite can still fit a small commit in a gap.
        await asyncio.to_thread(fill_up, small_fs / "filler2")
        # A limiter of its own: an earlier test's lines must not use up this interval.
        monkeypatch.setattr(logs, "_default_limiter", logs.RateLimiter(interval=60.0))
        caplog.clear()
        caplog.set_level(logging.INFO)
        before = agent.spool.counters.get("rejected_storage_error", 0)
        refused = 0
        for n in range(BURST):
            r = await post(s, agent.port, [event(10**6 + n * 10 + j) for j in range(10)])
            assert r.status in (200, 503)
            refused += r.status == 503
    assert refused >= BURST // 2, "the disk was not full"
    failed = [rec for rec in caplog.records if "spool commit failed" in rec.getMessage()]
    assert len(failed) == 1, [rec.getMessage() for rec in caplog.records]
    assert "disk full" in failed[0].getMessage()
    assert agent.spool.counters["rejected_storage_error"] - before == 10 * refused
