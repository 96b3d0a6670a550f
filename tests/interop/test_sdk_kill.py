"""Real client libraries against a real agent process that is killed, stopped and restarted
while they send.

The upstream is down while the agent is disrupted (so that nothing it forwards can be
resent for a lost ack of its own): every event a client sent must arrive once when it
comes back, in the order the client sent it, each client retrying with the same ids.
The kills are placed by what the clients saw acknowledged, never by sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import segment_up

analytics = pytest.importorskip("segment.analytics")
request_mod = pytest.importorskip("segment.analytics.request")
pytestmark = [pytest.mark.interop, pytest.mark.slow]

# What the agent goes through, in turn, as the clients' acknowledgements reach each mark.
DISRUPTIONS = ("kill", "term", "kill")
CLIENTS = 3
PER_CLIENT = 120


class Acks:
    """Counts the 2xx replies the SDKs' shared HTTP session got; fires ``hit`` at a mark."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.statuses: Counter[int] = Counter()
        self.marks: list[tuple[int, threading.Event]] = []

    def at(self, count: int) -> threading.Event:
        ev = threading.Event()
        with self.lock:
            self.marks.append((count, ev))
        return ev

    def hook(self, response: Any, *args: Any, **kwargs: Any) -> None:
        with self.lock:
            self.statuses[response.status_code] += 1
            if 200 <= response.status_code < 300:
                self.count += 1
            for count, ev in self.marks:
                if self.count >= count:
                    ev.set()


@pytest.fixture
def acks() -> Any:
    got = Acks()
    hooks = request_mod._session.hooks["response"]
    hooks.append(got.hook)
    yield got
    hooks.remove(got.hook)


async def disrupt(agent: AgentProcess, how: str) -> None:
    """Kill (SIGKILL) or stop (SIGTERM) the agent, then start it again on its port."""
    if how == "kill":
        agent.kill9()
    else:
        assert agent.terminate() == 0
    await asyncio.to_thread(agent.start)


async def drain(agent: AgentProcess, arrived: Callable[[], bool]) -> dict[str, Any]:
    """Ask the agent to send now until ``arrived()`` and its queue is empty: whatever it
    still held (a duplicate too) has gone upstream by then. Its status at that point."""
    async with aiohttp.ClientSession() as s, asyncio.timeout(40):
        while True:
            async with s.post(f"{agent.url}/flush") as r:
                assert r.status == 200
            async with s.get(f"{agent.url}/status") as r:
                status: dict[str, Any] = await r.json()
            if status["queue_depth"] == 0 and arrived():
                return status
            await asyncio.sleep(0.1)


async def test_python_clients_lose_and_repeat_nothing_across_kills_and_a_stop(
        tmp_path: Path, agent_process: Any, fake_segment: FakeSegment, acks: Acks) -> None:
    """Three segment-analytics-python clients, their batches of 5 queued at once: each
    client's one consumer thread resends the batch whose reply was cut, in place, on its
    backoff for network errors."""
    fake_segment.outage = (503, None)
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                       upstreams=[segment_up(fake_segment)])
    agent = agent_process(cfg, port).start()
    errors: list[Any] = []
    clients = [analytics.Client(f"key-{c}", host=agent.url, upload_interval=0.05,
                                upload_size=5, max_retries=10, timeout=5,
                                on_error=lambda e, b: errors.append(e))
               for c in range(CLIENTS)]
    for i in range(PER_CLIENT):
        for c, client in enumerate(clients):
            client.track(user_id="u", event="Ev", properties={"i": i},
                         message_id=f"c{c}-{i}")
    total_batches = CLIENTS * PER_CLIENT // 5
    # With other requests in flight: after 1/5, 2/5 and 3/5 of the batches were acknowledged.
    for mark, how in zip((total_batches // 5, 2 * total_batches // 5, 3 * total_batches // 5),
                         DISRUPTIONS):
        hit = acks.at(mark)
        assert await asyncio.to_thread(hit.wait, 60), (acks.count, acks.statuses)
        await disrupt(agent, how)
    for client in clients:
        await asyncio.to_thread(client.flush)
        await asyncio.to_thread(client.join)
    assert errors == []
    fake_segment.outage = None
    want = {f"c{c}-{i}" for c in range(CLIENTS) for i in range(PER_CLIENT)}
    await drain(agent, lambda: set(fake_segment.message_ids()) >= want)
    agent.terminate()
    ids = fake_segment.message_ids()
    assert [i for i, n in Counter(ids).items() if n > 1] == []
    for c in range(CLIENTS):
        mine = [int(i.split("-")[1]) for i in ids if i.startswith(f"c{c}-")]
        assert mine == sorted(mine), f"client {c} out of order"


NODE_DIR = Path(__file__).parent / "node"
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
NUCLEUS_EVENTS = 90


@needs_node
@pytest.mark.skipif(not (NODE_DIR / "node_modules" / "nucleus-nodejs").exists(),
                    reason="run `npm ci --prefix tests/interop/node` first")
async def test_a_nucleus_module_loses_and_repeats_nothing_across_kills_and_a_stop(
        tmp_path: Path, agent_process: Any) -> None:
    """nucleus-nodejs tracking an event every 20 ms, sending its queue every 200 ms: its
    socket cut by each kill or stop, it opens another at its next tick and resends what
    was not acknowledged, some of it stored already."""
    fake = await FakeNucleus().start()
    await fake.go_down()
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[{
        "name": "nucleus", "protocol": "nucleus-ws", "url": fake.url, "flush_interval_s": 0.1,
        "timeout_s": 5}])
    agent = agent_process(cfg, port).start()
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / ".config")}
    proc = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "nucleus_stream.js"), f"ws://127.0.0.1:{port}", "stream-app",
        str(NUCLEUS_EVENTS), "20", "60", cwd=NODE_DIR, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[str] = []
    acked: set[Any] = set()
    marks = list(zip((NUCLEUS_EVENTS // 4, NUCLEUS_EVENTS // 2, 3 * NUCLEUS_EVENTS // 4),
                     DISRUPTIONS))
    try:
        async with asyncio.timeout(90):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    break
                lines.append(line.rstrip("\n"))
                if line.startswith("RECV "):
                    acked.update(json.loads(line[5:]).get("reportedIds", []))
                    if marks and len(acked) >= marks[0][0]:
                        await disrupt(agent, marks.pop(0)[1])
            await proc.wait()
        assert lines[-1] == "DONE", lines[-20:]
        assert not marks
        sent: dict[Any, dict[str, Any]] = {}
        for line in lines:
            if line.startswith("SENT "):
                for ev in json.loads(line[5:])["data"]:
                    if ev.get("type") != "heartbeat":
                        sent[ev["id"]] = ev
        assert len(sent) == NUCLEUS_EVENTS
        await fake.come_back()
        await drain(agent, lambda: len(fake.events) >= NUCLEUS_EVENTS)
    finally:
        agent.terminate()
        await fake.stop()
    names = [ev["name"] for ev in fake.events]
    assert [n for n, k in Counter(names).items() if k > 1] == []
    assert names == [f"evt-{i}" for i in range(NUCLEUS_EVENTS)]


NODE_EVENTS = 150


async def read_lines(proc: asyncio.subprocess.Process, into: list[str],
                     changed: asyncio.Event) -> None:
    assert proc.stdout is not None
    try:
        while line := await proc.stdout.readline():
            into.append(line.decode().rstrip("\n"))
            changed.set()
    finally:
        changed.set()   # its end is news too


@needs_node
async def test_node_clients_lose_and_repeat_nothing_across_kills_and_a_stop(
        tmp_path: Path, agent_process: Any, fake_segment: FakeSegment) -> None:
    """Two @segment/analytics-node apps tracking an event every 5 ms, in batches of 5 (some
    sent at once, on several connections): a batch whose reply the kill or the stop cut
    is sent again, with the same messageIds, on the SDK's backoff."""
    fake_segment.outage = (503, None)
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                       upstreams=[segment_up(fake_segment)])
    agent = agent_process(cfg, port).start()
    keys = ["n0", "n1"]
    outs: dict[str, list[str]] = {k: [] for k in keys}
    changed = asyncio.Event()
    procs = [await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "segment_stream.mjs"), agent.url, key, str(NODE_EVENTS), "5",
        "6", cwd=NODE_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for key in keys]
    readers = [asyncio.create_task(read_lines(p, outs[k], changed)) for p, k in zip(procs, keys)]
    # Acknowledged batches (of 5), both clients' together.
    marks = list(zip((6, 12, 18), DISRUPTIONS))

    def oks() -> int:
        return sum(line == "RESPONSE 200" for lines in outs.values() for line in lines)

    try:
        async with asyncio.timeout(90):
            while marks:
                await changed.wait()
                changed.clear()
                if oks() >= marks[0][0]:
                    await disrupt(agent, marks.pop(0)[1])
                if all(r.done() for r in readers):
                    break
            await asyncio.gather(*readers)
            for p in procs:
                await p.wait()
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
    assert not marks, (oks(), outs)
    for key, lines in outs.items():
        assert lines[-1] == 'DONE {"errors":0}', (key, lines[-30:])
    fake_segment.outage = None
    want = {f"{k}-{i}" for k in keys for i in range(NODE_EVENTS)}
    await drain(agent, lambda: set(fake_segment.message_ids()) >= want)
    agent.terminate()
    ids = fake_segment.message_ids()
    assert [i for i, n in Counter(ids).items() if n > 1] == []
