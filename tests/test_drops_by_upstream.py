"""With several upstreams, the log lines of events dropped or refused at max_size_mb and
of those dropped past max_age_days say how many were each upstream's: "dropped 5 events
older than 1 days" told an operator of two upstreams nothing of which one lost them.

In-process agents on real spools, apps posting over HTTP, both upstreams down (a
FakeNucleus refusing connections); the lines are read from the log."""

from __future__ import annotations

import logging
import re
from typing import Any

import aiohttp
import pytest

from agent.clock import Clock
from agent.forwarder.backoff import Backoff
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_dropped_resend import event
from tests.test_resume import down_nucleus, nucleus_upstream, seams
from tests.waiting import wait_for

__all__ = ["down_nucleus"]   # the fixture

DAY_MS = 86_400_000


def two_upstreams(fake: FakeNucleus) -> list[dict[str, Any]]:
    """"analytics" takes app-a, "errors" app-b."""
    return [{**nucleus_upstream(fake, "nucleus-http"), "name": name, "keys": [key]}
            for name, key in (("analytics", "app-a"), ("errors", "app-b"))]


def lines(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


async def post_to(s: aiohttp.ClientSession, port: int, key: str,
                  events: list[dict[str, Any]]) -> int:
    async with s.post(f"http://127.0.0.1:{port}/app/{key}/track", json={"data": events}) as r:
        return r.status


async def test_expiry_says_how_many_events_of_each_upstream_it_dropped(
        make_agent: Any, down_nucleus: FakeNucleus, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "outpost")
    # A backoff of a minute, on manual timers: after their first failure, nothing is in
    # flight (expiry leaves what is to its answer).
    agent = await make_agent(upstreams=two_upstreams(down_nucleus),
                             storage={"max_age_days": 1},
                             seams=seams(ManualTiming(), Backoff(base_s=60.0)))
    async with aiohttp.ClientSession() as s:
        for key, n in (("app-a", 3), ("app-b", 2)):
            assert await post_to(s, agent.port, key, [event(i) for i in range(n)]) == 200
        states = [agent.forwarding.states[up] for up in ("analytics", "errors")]
        await wait_for(lambda: all(st.retries == 1 and st.unreachable_since is not None
                                   for st in states))
        # A clock mark after them (the next commit a minute on), which dates their records.
        clock.passed_ms += 61_000
        assert await post_to(s, agent.port, "app-a", [event(100)]) == 200
    clock.passed_ms += 2 * DAY_MS
    caplog.clear()
    assert await agent.spool.prune() == 6
    said = lines(caplog, "older than")
    assert said == ["dropped 6 events older than 1 days (analytics: 4, errors: 2)"], caplog.text


async def test_drop_oldest_says_whose_queued_events_it_deleted(
        make_agent: Any, down_nucleus: FakeNucleus, caplog: pytest.LogCaptureFixture) -> None:
    """The oldest events are errors' (app-b's): the line names errors, not analytics,
    whose request made them go."""
    caplog.set_level(logging.WARNING, "outpost")
    agent = await make_agent(upstreams=two_upstreams(down_nucleus),
                             storage={"max_size_mb": 1, "when_full": "drop_oldest"})
    async with aiohttp.ClientSession() as s:
        for n in range(0, 250, 5):   # ~190 KB of errors' events, the oldest
            assert await post_to(s, agent.port, "app-b",
                                 [event(n + j, pad=750) for j in range(5)]) == 200
        n = 0
        while not agent.spool.counters.get("dropped_full", 0):
            assert n < 5000, "the spool never filled"
            assert await post_to(s, agent.port, "app-a",
                                 [event(n + j, pad=750) for j in range(5)]) == 200
            n += 5
    dropped = agent.spool.counters["dropped_full"]
    said = lines(caplog, "oldest queued events")
    assert len(said) == 1, caplog.text
    assert re.fullmatch(rf"spool at max_size_mb: deleted the {dropped} oldest queued events "
                        r"to make room \(when_full = \"drop_oldest\"; counted as dropped_full\)"
                        rf" \(errors: {dropped}\)", said[0]), said[0]


async def test_a_refusal_at_the_cap_says_whose_events_it_refused(
        make_agent: Any, down_nucleus: FakeNucleus, caplog: pytest.LogCaptureFixture) -> None:
    """when_full = "reject": the spool holds errors' events, and analytics' request that
    finds it full is refused: the line says analytics'."""
    caplog.set_level(logging.WARNING, "outpost")
    agent = await make_agent(upstreams=two_upstreams(down_nucleus),
                             storage={"max_size_mb": 1, "when_full": "reject"})
    async with aiohttp.ClientSession() as s:
        for n in range(0, 250, 5):
            assert await post_to(s, agent.port, "app-b",
                                 [event(n + j, pad=750) for j in range(5)]) == 200
        n = 0
        while await post_to(s, agent.port, "app-a",
                            [event(n + j, pad=750) for j in range(4)]) == 200:
            assert n < 5000, "the spool never filled"
            n += 4
    said = lines(caplog, "retry-later status")
    assert len(said) == 1, caplog.text
    assert said[0].startswith("spool at max_size_mb: refused 4 events"), said[0]
    assert said[0].endswith(" (analytics: 4)"), said[0]
