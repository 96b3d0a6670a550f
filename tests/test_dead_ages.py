"""Dead letters made while the wall clock was wrong (a board that woke in 1970, a clock
set ten years ahead), shown once NTP has corrected it: their ages are the time the agent
saw pass since they were dead-lettered, as the queue's oldest event's is, and the newest
reasons are the newest by that time.

Read by the wall clock alone, letters from 1970 showed ~20,794 days old, and letters from
ten years ahead "0s ago", kept at the top of the newest reasons for ten years.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.clock import Clock
from agent.spool import migrate_dead
from tests.conftest import free_port
from tests.fakes.ops_scene import post_events
from tests.test_clock import SKEWS
from tests.test_dead_letters import RefusingNucleus, dead_letters, upstream
from tests.waiting import run_outpost

HOUR_S = 3600
HOUR_MS = HOUR_S * 1000


async def get(port: int, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


def about(seconds: float, hours: int) -> bool:
    """Whether ``seconds`` is ``hours`` and the seconds the test itself took."""
    return hours * HOUR_S <= seconds < hours * HOUR_S + 60


@pytest.mark.parametrize("skew", list(SKEWS), ids=list(SKEWS))
async def test_dead_letters_made_under_a_wrong_clock_show_the_time_the_agent_saw_pass(
        make_agent: Any, clock: Clock, skew: str) -> None:
    up = RefusingNucleus()
    await up.start()
    try:
        clock.wall_shift_ms = SKEWS[skew]()
        first = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        await post_events(first.port, "app-a", range(3))
        await dead_letters(first, 3)               # HTTP 400, under the wrong clock
        await first.stop()
        clock.wall_shift_ms = 0                    # NTP corrects it; the agent restarts
        up.refuse = 422
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        clock.passed_ms += 2 * HOUR_MS             # two hours the agent sees pass
        await post_events(agent.port, "app-b", range(10, 11))
        await dead_letters(agent, 4)               # HTTP 422, under the right clock
        clock.passed_ms += HOUR_MS
        await shown_by_the_time_the_agent_saw_pass(agent)
    finally:
        await up.stop()


# Damage that has the restart salvage the spool (as in tests/test_salvage.py): a value
# garbled. With the clock marks, the agent's time is lost too: it resumes at the salvage,
# and the letters count their age from there, as the events whose mark is lost do.
DAMAGE = {"queue-depth": "UPDATE streams SET depth = 'garbage'",
          "clock-marks": "UPDATE clock_marks SET next_seq = 'garbage'"}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
@pytest.mark.parametrize("skew", list(SKEWS), ids=list(SKEWS))
async def test_dead_letters_salvaged_from_a_corrupt_spool_keep_the_time_the_agent_saw_pass(
        make_agent: Any, clock: Clock, tmp_path: Path, skew: str, damage: str) -> None:
    """The same letters, the spool found damaged at the restart: the salvage copied the
    letters without the agent-observed time of their dead-lettering, and they were aged and
    ordered by the wall clock again, ~20,793 days old, or "0s" and kept at the top of the
    newest reasons. Copied, a time past where the agent's resumes (its clock marks lost: it
    resumes at the salvage's) read "0s", on top, until the agent's count caught up."""
    up = RefusingNucleus()
    await up.start()
    try:
        clock.wall_shift_ms = SKEWS[skew]()
        first = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        clock.passed_ms += 10 * 24 * HOUR_MS       # the agent's count well past its start's
        await post_events(first.port, "app-a", range(3))
        await dead_letters(first, 3)               # HTTP 400, under the wrong clock
        await first.stop()
        with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as db, db:
            db.execute(damage)
        clock.wall_shift_ms = 0                    # NTP corrects it; the agent restarts
        up.refuse = 422
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        spool = agent.spool
        assert spool.counters.get("spool_corrupt") == 1, "no salvage at the restart"
        assert spool.dead_count == 3 and spool.counters.get("dead_dropped_corrupt", 0) == 0
        clock.passed_ms += 2 * HOUR_MS             # two hours the agent sees pass
        await post_events(agent.port, "app-b", range(10, 11))
        await dead_letters(agent, 4)               # HTTP 422, under the right clock
        clock.passed_ms += HOUR_MS
        await shown_by_the_time_the_agent_saw_pass(agent)
        assert spool.db is not None
        assert await spool.db.run(migrate_dead.agrees)   # the summary counts them as they are
    finally:
        await up.stop()


async def shown_by_the_time_the_agent_saw_pass(agent: Any) -> None:
    """Three letters (HTTP 400) dead-lettered three hours ago by the agent's time, under
    a wrong wall clock, and one (HTTP 422) an hour ago, under the right one: shown so, the
    422 first, by `outpost dead list`, `outpost status`, /status and /dead."""
    cfg = agent.config_path
    # `outpost dead list`: the 400s were dead-lettered three hours ago, the 422 one.
    code, listed = await run_outpost("dead", "list", "--config", cfg)
    assert code == 0, listed
    rows = [ln.split() for ln in listed.splitlines() if " HTTP 4" in ln]
    groups = [r for r in rows if r[1] == "up"]
    assert [g[:4] for g in groups] == [["1", "up", "1.0h", "1.0h"],
                                       ["3", "up", "3.0h", "3.0h"]], listed
    entries = [r for r in rows if r[2] == "up"]
    assert [e[3] for e in entries] == ["3.0h"] * 3 + ["1.0h"], listed

    # `outpost status`: the newest reasons, newest first, with their ages.
    code, text = await run_outpost("status", "--config", cfg)
    assert code == 0, text
    shown = [ln.split() for ln in text.splitlines() if " HTTP 4" in ln]
    assert [s[:5] for s in shown] == [["1", "up", "1.0h", "ago", "HTTP"],
                                      ["3", "up", "3.0h", "ago", "HTTP"]], text

    # GET /status and GET /dead, as the status page and `--json` read them.
    snap = await get(agent.port, "/status")
    assert [g["reason"][:8] for g in snap["dead_reasons"]] == ["HTTP 422", "HTTP 400"]
    assert [about(g["newest_age_s"], h) for g, h in zip(snap["dead_reasons"], (1, 3),
                                                         strict=True)] == [True] * 2, snap
    got = await get(agent.port, "/dead")
    assert [g["reason"][:8] for g in got["groups"]] == ["HTTP 422", "HTTP 400"]
    assert [(about(g["oldest_age_s"], h), about(g["newest_age_s"], h))
            for g, h in zip(got["groups"], (1, 3), strict=True)] == [(True, True)] * 2, got
    assert [about(e["age_s"], h) for e, h in zip(got["entries"], (3, 3, 3, 1),
                                                 strict=True)] == [True] * 4, got
    code, raw = await run_outpost("dead", "list", "--json", "--config", cfg)
    assert code == 0, raw
    assert [(g["reason"], about(g["newest_age_s"], h)) for g, h in zip(
        json.loads(raw)["groups"], (1, 3), strict=True)] == [
        (g["reason"], True) for g in got["groups"]], raw
