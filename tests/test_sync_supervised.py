"""The transmit profile's watchers are supervised: one that fails is logged with its
traceback, counted and shown as the sync's last error, and started again; stopping
the agent never re-raises it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agent.settings import SyncConfig
from agent.sync.metered import Report
from agent.sync.monitor import SyncMonitor
from agent.sync.policy import Metered, MeteredReading
from tests.fakes.manual_timing import ManualTiming
from tests.waiting import wait_for


class FailsOnce:
    """A metered source that reports "metered", then fails as a malformed D-Bus signal
    would; started again, it reports "not metered" and watches on."""

    def __init__(self) -> None:
        self.starts = 0

    async def watch(self, report: Report) -> None:
        self.starts += 1
        if self.starts == 1:
            report(MeteredReading(Metered.YES, "test: metered"))
            raise IndexError("tuple index out of range")
        report(MeteredReading(Metered.NO, "test: not metered"))
        await asyncio.Event().wait()


async def nothing_queued(lanes: tuple[int, ...], after: int) -> float | None:
    return None


async def test_a_failing_metered_watch_is_reported_and_started_again(
        caplog: pytest.LogCaptureFixture) -> None:
    timing = ManualTiming()
    source = FailsOnce()
    monitor = SyncMonitor(SyncConfig(on_metered="hold"), source, lambda: None, nothing_queued,
                          timing, lambda: None, lambda: 0)
    await monitor.start()
    await wait_for(lambda: monitor.view().get("errors") == 1, timeout=5)
    view = monitor.view()
    assert "IndexError: tuple index out of range" in view["last_error"]
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    timing.advance(60.0)   # restarted within a minute
    await wait_for(lambda: source.starts == 2 and monitor.view()["profile"] == "normal")
    await monitor.stop()   # returns; nothing is re-raised
