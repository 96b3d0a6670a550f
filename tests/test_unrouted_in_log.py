"""Queued events a reload or a start leaves with no route (an upstream removed, its `keys`
narrowed) are named in the log, as /status, `outpost status` and
`outpost_unrouted_queue_events` show them: kept, never sent, until a route takes their key,
and gone after max_age_days. The log said nothing of them, and their expiry only
"dropped N events older than D days". Keys are credentials: the line names them by
fingerprint (as the dead letters and the tail show them), never as they are.

In-process agents on a real spool; ``Agent.reload`` is what SIGHUP runs."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from agent.clock import Clock
from agent.forwarder.backoff import Backoff
from agent.logs import fingerprint
from tests.conftest import write_config
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_resume import down_nucleus, nucleus_upstream, quiet, seams
from tests.test_upstream_faults import event, send
from tests.waiting import wait_for

__all__ = ["down_nucleus"]   # the fixture, shared with tests/test_resume.py

KEPT = "wk-kept-Q7s2"
GONE = [f"wk-gone-{i}-Zr8Lp" for i in range(5)]   # write keys: secrets
DAY_MS = 86_400_000


def unrouted_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "match no upstream" in r.getMessage()]


async def queued(make_agent: Any, fake: FakeNucleus, **kw: Any) -> Any:
    """An agent whose upstream (down) takes every key, with 2 events queued for KEPT and
    for each GONE key."""
    agent = await make_agent(upstreams=[{**nucleus_upstream(fake, "nucleus-http"),
                                         "keys": ["*"]}], **kw)
    for n, key in enumerate([KEPT, *GONE]):
        await send(agent, [event(2 * n), event(2 * n + 1)], key)
    assert agent.spool.depth == 12
    return agent


async def marked(agent: Any, clock: Clock) -> None:
    """A clock mark after the events queued so far: expiry dates a record by the mark
    written after it (the next commit a minute on), as the agent's steady traffic does."""
    clock.passed_ms += 61_000
    await send(agent, [event(1000 + clock.passed_ms // 1000)], KEPT)


def narrowed(agent: Any, fake: FakeNucleus, keys: list[str], **kw: Any) -> None:
    write_config(Path(agent.config_path), agent.spool.path,
                 upstreams=[{**nucleus_upstream(fake, "nucleus-http"), "keys": keys}], **kw)


async def test_a_reload_that_leaves_queued_events_without_a_route_says_so_once(
        make_agent: Any, down_nucleus: FakeNucleus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "outpost")
    agent = await queued(make_agent, down_nucleus, storage={"max_age_days": 9})
    assert unrouted_lines(caplog) == []   # all routed at the start: nothing said

    narrowed(agent, down_nucleus, [KEPT], storage={"max_age_days": 9})
    caplog.clear()
    await agent.reload()
    lines = unrouted_lines(caplog)
    assert len(lines) == 1, caplog.text
    line = lines[0]
    assert re.search(r"\b10 queued events of 5 keys?\b", line), line
    shown = [fp for fp in map(fingerprint, GONE) if fp in line]
    assert 1 <= len(shown) <= 3 and f"{5 - len(shown)} more" in line, line
    assert fingerprint(KEPT) not in line, line
    assert "kept" in line and "not sent" in line and "9 days" in line, line
    assert not any(key[:7] in caplog.text for key in [KEPT, *GONE]), caplog.text
    assert [r.levelno for r in caplog.records if r.getMessage() == line] == [logging.WARNING]

    narrowed(agent, down_nucleus, ["*"], storage={"max_age_days": 9})   # routed again
    caplog.clear()
    await agent.reload()
    assert unrouted_lines(caplog) == [], caplog.text


async def test_a_start_with_an_edited_config_that_leaves_events_without_a_route_says_so(
        make_agent: Any, down_nucleus: FakeNucleus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "outpost")
    agent = await queued(make_agent, down_nucleus)
    await agent.stop()
    caplog.clear()
    again = await make_agent(spool=agent.spool.path,
                             upstreams=[{**nucleus_upstream(down_nucleus, "nucleus-http"),
                                         "keys": [KEPT, *GONE[:2]]}])
    assert again.spool.depth == 12
    lines = unrouted_lines(caplog)
    assert len(lines) == 1, caplog.text
    assert re.search(r"\b6 queued events of 3 keys?\b", lines[0]), lines[0]
    assert all(fingerprint(key) in lines[0] for key in GONE[2:]), lines[0]   # each of them
    assert "more" not in lines[0], lines[0]
    assert not any(key[:7] in caplog.text for key in [KEPT, *GONE]), caplog.text


async def test_events_without_a_route_that_expire_are_said_to_have_had_none(
        make_agent: Any, down_nucleus: FakeNucleus, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "outpost")
    # Expiry leaves the records of a batch in flight to their answer (spool/leases.py):
    # a retry to the down upstream under way as it ran kept them to the next run. Each
    # key parks after its first failure, for a backoff of a minute by a forwarder clock
    # that moves only when told (two days on CLOCK fire no retry), and new data waits with
    # it: from then on no loop runs, so nothing is leased.
    timing = ManualTiming()
    agent = await queued(make_agent, down_nucleus, storage={"max_age_days": 1},
                         seams=seams(timing, Backoff(base_s=60.0)))
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.parked == 6)
    await quiet(agent, timing, 2)   # the keys' retry and the next probe
    narrowed(agent, down_nucleus, [KEPT, GONE[0]], storage={"max_age_days": 1})
    await agent.reload()
    assert agent.forwarding.states["up"].parked == 2   # its routed keys, still parked
    await marked(agent, clock)
    assert not agent.forwarding.loops
    clock.passed_ms += 2 * DAY_MS   # two days pass, by both clocks
    caplog.clear()
    assert await agent.spool.prune() == 13   # and the marking one
    expired = [r.getMessage() for r in caplog.records if "older than" in r.getMessage()]
    assert len(expired) == 1, caplog.text
    assert re.search(r"dropped 13 events older than 1 days\b.*\b8 of them\b.*no upstream",
                     expired[0]), expired[0]

    # Only events with a route (the one that marked the time above): nothing of routes.
    await marked(agent, clock)
    assert not agent.forwarding.loops
    clock.passed_ms += 2 * DAY_MS
    caplog.clear()
    assert await agent.spool.prune() == 1
    assert "no upstream" not in caplog.text and "dropped 1 events" in caplog.text, caplog.text


async def test_a_start_with_no_upstream_and_events_queued_says_so_in_one_line(
        make_agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    """No upstream configured at all, events queued from a run before: the start warned
    twice of one thing ("no upstream is configured: events are kept in the spool until one
    is", then "5 queued events of 1 key(s) ... match no upstream: kept in the spool").
    One line says it, with what each said: the count, the keys by fingerprint, the fix,
    the expiry."""
    caplog.set_level(logging.WARNING, "outpost")
    agent = await make_agent(storage={"max_age_days": 9})
    await send(agent, [event(i) for i in range(5)], KEPT)
    await agent.stop()
    caplog.clear()
    again = await make_agent(spool=agent.spool.path, storage={"max_age_days": 9})
    assert again.spool.depth == 5
    said = [r.getMessage() for r in caplog.records
            if "upstream" in r.getMessage() or "queued" in r.getMessage()]
    assert len(said) == 1, said
    line = said[0]
    assert "no upstream is configured" in line and "[[upstream]]" in line, line
    assert re.search(r"\b5 queued events of 1 key", line) and fingerprint(KEPT) in line, line
    assert "kept in the spool" in line and "9 days" in line, line
    assert KEPT[:7] not in caplog.text, caplog.text
