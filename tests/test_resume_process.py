"""The real agent process delivers everything after an outage long enough that its key's
own next try is far off (issue 13 §1: "down for 3 minutes while apps post").

What makes a long outage slow to recover from is the backoff: a key waits 0.5 s
doubling, each times a jitter in [0.5, 1), up to 30 to 60 s between tries (its cap,
after 8 failures, about 50 s of real time: tests/test_resume.py takes an agent there on
a manual clock). Only the upstream's prober can end such a wait early. So the upstream
stays down until the agent's `/status` counts the first key's 5th failure, whose wait
is at least 4 s (the test polls every 0.1 s: nearly all of it is left); it then comes
back at once, and every event must arrive, once, in order per (key, lane): every third
event the first app posts is an ``error`` (the high lane), and the second app's last
event is its session's ``init``, so each key's high events, all queued together, must
arrive first, each lane in the order posted.
A second app starts posting only then, so its failures cannot be mistaken for the first
key's.

How soon it resumes is recorded (`resumed_after_s`), not asserted: a wall-clock bound is
a flaky test on a loaded machine. That the probe, not the key's own retry, brings the
delivery is tests/test_resume.py's, on a manual clock where a delivery while the key's
retry is still far off can only have come from a probe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_upstream_faults import event

pytestmark = pytest.mark.slow

FAILURES = 5   # the 5th backoff is 0.5 * 2**4 s times [0.5, 1): 4 to 8 s


def high(i: int) -> bool:
    """Whether event ``i`` is posted as an ``error`` (app1) or ``init`` (app2)."""
    return i % 3 == 2 if i < 1000 else i == 1009


async def post(session: aiohttp.ClientSession, agent: AgentProcess, key: str,
               ids: list[int]) -> None:
    data = [{**event(i), "type": ("error" if i < 1000 else "init") if high(i) else "event"}
            for i in ids]
    async with session.post(f"{agent.url}/app/{key}/track", json={"data": data}) as r:
        assert r.status == 200, await r.text()


async def upstream_status(session: aiohttp.ClientSession, agent: AgentProcess) -> Any:
    async with session.get(f"{agent.url}/status") as r:
        return (await r.json())["upstreams"][0]


def by_key(fake: FakeNucleus) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for path, ids in zip(fake.paths, fake.batches):
        out.setdefault(path.split("/")[2], []).extend(ids)
    return out


async def test_after_a_long_outage_everything_arrives_once_in_order(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        record_property: Callable[[str, object], None]) -> None:
    fake = await FakeNucleus().start(free_port())
    await fake.go_down()
    port = free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[
        {"name": "up", "protocol": "nucleus-ws", "url": fake.url, "flush_interval_s": 0.05,
         "timeout_s": 5}])
    agent = agent_process(config, port)
    await asyncio.to_thread(agent.start)
    posted: dict[str, list[int]] = {"app1": [], "app2": []}
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 60   # 5 failures take 4 to 8 s
            next_post = time.monotonic()
            while (up := await upstream_status(s, agent))["retries"] < FAILURES:
                assert time.monotonic() < deadline, up
                if time.monotonic() >= next_post:   # the app keeps posting, every 2 s
                    posted["app1"].append(len(posted["app1"]))
                    await post(s, agent, "app1", posted["app1"][-1:])
                    next_post = time.monotonic() + 2
                await asyncio.sleep(0.1)
            assert up["state"] == "unreachable" and up["probes"] > 0, up
            posted["app2"] = list(range(1000, 1010))
            await post(s, agent, "app2", posted["app2"])
            await fake.come_back()
            back = time.monotonic()
            want = {i for ids in posted.values() for i in ids}
            # A hang guard past the key's own retry (its backoff is 4 to 8 s).
            while not want <= set(fake.ids()) and time.monotonic() - back < 30:
                await asyncio.sleep(0.02)
            took = time.monotonic() - back
        record_property("resumed_after_s", round(took, 2))
        print(f"resumed {took:.2f}s after the upstream came back")
        # Everything, once, in order per (key, lane), the high lane first.
        assert by_key(fake) == {key: [i for i in ids if high(i)] + [i for i in ids if not high(i)]
                                for key, ids in posted.items()}
        assert agent.terminate() == 0
        assert agent.log.read_text().count("upstream up recovered after") == 1
    finally:
        await fake.stop()
