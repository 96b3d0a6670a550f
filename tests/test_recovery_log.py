"""What the log of a real agent process says about upstreams that go away and come back
(issue 14 §4): per upstream, with that upstream's own numbers, a backoff line (at most
once a minute), one line when it is found unreachable, and one when it has recovered:
"upstream X recovered after N s; M events delivered", logged once the backlog it had
when it came back is delivered."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_resume_process import post
from tests.waiting import wait_for

# Per upstream: its key, and how many events its app posts while it is away.
BACKLOG = {"east": ("app-east", 3), "west": ("app-west", 5)}


async def statuses(agent: AgentProcess) -> dict[str, dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/status") as r:
        return {u["name"]: u for u in (await r.json())["upstreams"]}


async def test_each_upstream_logs_its_own_outage_and_recovery_with_its_own_numbers(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    fakes = {name: await FakeNucleus().start(free_port()) for name in BACKLOG}
    port = free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[
        {"name": name, "protocol": "nucleus-http", "url": fakes[name].http_url,
         "keys": [key], "flush_interval_s": 0.05, "timeout_s": 2}
        for name, (key, _) in BACKLOG.items()])
    agent = agent_process(config, port)
    await asyncio.to_thread(agent.start)
    try:
        for fake in fakes.values():
            await fake.go_down()
        async with aiohttp.ClientSession() as s:
            for name, (key, n) in BACKLOG.items():
                await post(s, agent, key, list(range(n)))
            deadline = time.monotonic() + 20
            while True:   # bounded: a failed send is probed at once
                states = await statuses(agent)
                if all(u["state"] == "unreachable" for u in states.values()):
                    break
                assert time.monotonic() < deadline, states
                await asyncio.sleep(0.1)
            # One comes back, then the other: each recovery counts only its own events.
            # Each line is logged at the report's next check (PROBE_S, 2 s): the second
            # upstream comes back while the first's is still due, not 2 s after it.
            for name, fake in fakes.items():
                await fake.come_back()
                await wait_for(lambda: len(fake.ids()) == BACKLOG[name][1])  # noqa: B023
            for name in fakes:
                await wait_for(lambda: f"upstream {name} recovered" in  # noqa: B023
                               agent.log.read_text(), timeout=20)
        assert agent.terminate() == 0
    finally:
        for fake in fakes.values():
            await fake.stop()
    log = agent.log.read_text()
    for name, (_, n) in BACKLOG.items():
        recovered = re.findall(rf"upstream {name} recovered after (\d+)s; (\d+) events? "
                               r"delivered", log)
        assert len(recovered) == 1, log
        assert int(recovered[0][1]) == n, log
        assert len(re.findall(rf"upstream {name} unreachable \(", log)) == 1, log
        assert re.search(rf"upstream {name}: request failed: .*; retrying in", log), log
    assert "reachable again" not in log
