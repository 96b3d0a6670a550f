"""A Nucleus `date` without a zone (nucleus-python writes the device's local time) in the
hour a DST change repeats, as a Segment upstream receives it (docs/mapping.md §4)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

from agent.clock import Clock
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import call, segment_up, wait_for


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _at(clock: Clock, iso: str) -> None:
    """Set the agent's wall clock to ``iso``."""
    target = int(datetime.fromisoformat(iso).astimezone(timezone.utc).timestamp() * 1000)
    clock.wall_shift_ms = target - time.time_ns() // 1_000_000


async def test_a_local_date_in_the_repeated_hour_is_the_one_before_its_receipt(
        make_agent: Any, fake_segment: FakeSegment, clock: Clock, berlin: None) -> None:
    # 2026-10-25 in Berlin: 02:00-03:00 comes twice, first at +02:00, then at +01:00.
    # A python module's event of 02:30 in the second pass, received at 02:45 (+01:00),
    # happened at 01:30Z; it was read as the first pass, 00:30Z: an hour before it
    # happened, before events of the first pass sent after it.
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    _at(clock, "2026-10-25T02:45:00+02:00")   # the first pass
    first = {"type": "event", "name": "first", "id": 1, "machineId": "m",
             "date": "2026-10-25T02:30:00"}
    assert (await call(agent.port, "/app/k/track", {"data": [first]})).status == 200
    _at(clock, "2026-10-25T02:45:00+01:00")   # the second pass
    second = {"type": "event", "name": "second", "id": 2, "machineId": "m",
              "date": "2026-10-25T02:30:00.250"}
    assert (await call(agent.port, "/app/k/track", {"data": [second]})).status == 200
    await wait_for(lambda: len(fake_segment.events) == 2)
    got = {ev["event"]: ev for ev in fake_segment.events}
    assert got["first"]["timestamp"] == "2026-10-25T00:30:00.000Z"
    assert got["second"]["receivedAt"].startswith("2026-10-25T01:45:")   # the clock set
    assert got["second"]["timestamp"] == "2026-10-25T01:30:00.250Z"
    # The date as sent travels too (§3: not already ISO 8601 UTC).
    assert got["second"]["context"]["nucleus"]["date"] == "2026-10-25T02:30:00.250"
