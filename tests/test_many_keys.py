"""Many distinct keys: each costs the agent little memory and a flat amount of CPU.

With the default ``accept_keys = []`` any local process can invent keys; an agent
that kept a forwarder, a connection and a growing redaction regex per key swelled
by about 100 KB and spent ever more CPU on each new one.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import random
import re
import statistics
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
from aiohttp import WSMsgType, web

from agent.forwarder.supervisor import Seams
from agent.spool.schema import read_offline
from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.waiting import run_outpost, wait_for

CHUNK = 1_000
CONNECTIONS = 16
IDLE_KEY_BYTES = 2 * 1024
# Over the 2,000 keys the websocket test can afford, allocator noise alone moves the
# slope by about 1.5 KB per key; the 2 KB target is held over 10,000 keys by the
# Segment test, and `python -m bench.many_keys` measures 100,000. The old cost was
# about 100 KB per key, so this bound still catches a per-key connection or loop.
NOISY_IDLE_KEY_BYTES = 8 * 1024
# Keys parked in an outage: 8,000 of them measure 1,360-1,880 B a key on a quiet AMD EPYC
# and 2,413 B once beside a full suite (allocator noise over a short run), 6,000 of them
# 1,294 B against 1,032 B for the first 8,000 in the same run; the bug this guards kept
# each key's loop, 10,281 B a key. The 2 KB target itself is held over 10,000 keys by the
# Segment test.
OUTAGE_KEY_BYTES = 4 * 1024
CHUNK_TIMEOUT_S = 20.0   # a chunk takes ~1 s; the O(n²) code took 40 s for the first one
DRAIN_TIMEOUT_S = 90.0   # every key's queue after a flush (see its use)


def key_of(i: int) -> str:
    return f"mk{i:06d}x7Qz"


KEY_IN_TEXT = re.compile(r"mk\d{6}x7Qz")


def segment_request(port: int, i: int) -> bytes:
    body = orjson.dumps({"event": "e", "userId": "u", "messageId": f"m{i}"})
    auth = base64.b64encode(f"{key_of(i)}:".encode()).decode()
    return (f"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Basic {auth}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def nucleus_request(port: int, i: int) -> bytes:
    body = orjson.dumps({"data": [{"type": "event", "name": "e", "id": i, "sessionId": 1}]})
    return (f"POST /app/{key_of(i)}/track HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def post_all(port: int, requests: range, build: Callable[[int, int], bytes]) -> None:
    """One request per key over keep-alive connections: a raw client, so that the test
    process spends little of the machine's CPU next to the agent it measures."""
    numbers = iter(requests)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in numbers:
                writer.write(build(port, i))
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
                body = await reader.readexactly(length)
                assert status < 300, (status, body)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def reached(count: Callable[[], int], n: int) -> Callable[[], bool]:
    return lambda: count() >= n


def retries(agent: AgentProcess) -> int:
    """The agent's retries of its one upstream, from /status (a blocking read: brief)."""
    with urllib.request.urlopen(f"{agent.url}/status", timeout=5) as r:
        return int(json.load(r)["upstreams"][0]["retries"])


async def feed_and_measure(agent: AgentProcess, keys: int, delivered: Callable[[], int],
                           build: Callable[[int, int], bytes],
                           settled: Callable[[], bool] = lambda: True,
                           ) -> list[tuple[int, int, float]]:
    """Feed ``keys`` distinct keys in chunks; after each chunk is delivered upstream and
    ``settled`` (its keys' connections closed), (keys so far, agent RSS, agent CPU
    seconds the chunk took)."""
    assert agent.proc is not None
    proc = psutil.Process(agent.proc.pid)
    samples = []
    for start in range(0, keys, CHUNK):
        before = cpu_seconds(proc)
        try:
            await asyncio.wait_for(post_all(agent.port, range(start, start + CHUNK), build),
                                   CHUNK_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(f"keys {start} to {start + CHUNK} not accepted within "
                                 f"{CHUNK_TIMEOUT_S} s") from None
        await wait_for(reached(delivered, start + CHUNK), timeout=CHUNK_TIMEOUT_S)
        # RSS is compared between chunks: measure each with no key's loop still ending.
        await wait_for(settled, timeout=CHUNK_TIMEOUT_S)
        samples.append((start + CHUNK, proc.memory_info().rss, cpu_seconds(proc) - before))
    return samples


def check_costs(samples: list[tuple[int, int, float]], log: str,
                per_key_bound: int = IDLE_KEY_BYTES) -> None:
    (n1, _, _), (_, _, first_cpu) = samples[0], samples[1]
    n2, _, last_cpu = samples[-1]
    # The slope's Theil-Sen estimate (the median of every pair's): a cost per key shows in
    # every pair, while one sample caught in a burst of the allocator's (a busy machine:
    # 2,171 B a key once, from the first and last samples alone) moves only its own pairs.
    per_key = statistics.median((r2 - r1) / (k2 - k1) for (k1, r1, _), (k2, r2, _)
                                in itertools.combinations(samples, 2))
    assert per_key <= per_key_bound, (
        f"{per_key:.0f} bytes of RSS per idle key (between {n1} and {n2} keys: "
        f"{[(k, rss) for k, rss, _ in samples]})")
    # The second chunk, not the first: the first also pays for warming up.
    assert last_cpu <= 2 * first_cpu + 0.2, (
        f"the last {CHUNK} keys took {last_cpu:.2f} s of CPU, the second {CHUNK} {first_cpu:.2f} s")
    assert not KEY_IN_TEXT.search(log), KEY_IN_TEXT.search(log)


def agent_config(tmp_path: Path, upstream: dict[str, Any]) -> tuple[Path, int]:
    port = free_port()
    up = {"name": "up", "flush_interval_s": 0.05, **upstream}
    # Past the default listen.max_keys: this measures what each key costs.
    return write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                        listen={"max_keys": 100_000},
                        storage={"sync": "normal"}, upstreams=[up]), port


async def test_10k_segment_write_keys_cost_flat_memory_and_cpu(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        fake_segment: FakeSegment) -> None:
    cfg, port = agent_config(tmp_path, {"protocol": "segment-http", "url": fake_segment.url})
    agent = agent_process(cfg, port).start()
    # 10,000 keys: a slope of 835 B a key (729 B over 20,000 keys, where the first
    # 10,000 of the same run gave the 835), under half the bound, where the bug cost
    # ~100 KB a key; and 10 chunks, so a cost per key that grows with the keys makes the
    # last chunk 5x the second, where the CPU check allows 2x.
    samples = await feed_and_measure(agent, 10_000, lambda: len(fake_segment.events),
                                     segment_request)
    assert {r.write_key for r in fake_segment.requests} == {key_of(i) for i in range(10_000)}
    # Status aggregates per upstream and skips idle keys: nothing in it grows per key.
    await wait_for(lambda: read_offline(tmp_path / "spool.db")["depth"] == 0)
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/status") as r:
        snap = await r.json()
    assert [(u["name"], u["keys"], u["queue_depth"]) for u in snap["upstreams"]] == [("up", 0, 0)]
    agent.terminate()
    check_costs(samples, agent.log.read_text())


async def test_3k_nucleus_app_ids_release_their_websockets(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        fake_nucleus: FakeNucleus) -> None:
    cfg, port = agent_config(tmp_path, {"protocol": "nucleus-ws", "url": fake_nucleus.url})
    agent = agent_process(cfg, port).start()
    # An idle key keeps no connection open upstream.
    samples = await feed_and_measure(agent, 3_000, lambda: len(fake_nucleus.events),
                                     nucleus_request, lambda: fake_nucleus.open_connections == 0)
    agent.terminate()
    check_costs(samples, agent.log.read_text(), NOISY_IDLE_KEY_BYTES)


async def test_6k_keys_waiting_out_an_outage_cost_little_and_are_all_delivered(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        fake_segment: FakeSegment) -> None:
    """Keys whose events are queued while the upstream refuses them (down, or 401 for
    invented keys) must cost no more than idle ones: each used to keep its forwarding
    loop, sleeping out its backoff, until its events were delivered."""
    # 6,000: the slope stays under a third of the bound of 4 KB a key (the bug's 10 KB
    # would be two and a half times it), and 6 chunks make a per-key cost growing with the
    # keys 3x the second chunk's CPU, where the check allows 2x.
    keys = 6_000
    # A long Retry-After: each key is refused once, then waits while RSS is measured.
    fake_segment.outage = (503, "3600")
    cfg, port = agent_config(tmp_path, {"protocol": "segment-http", "url": fake_segment.url})
    agent = agent_process(cfg, port).start()
    # Measured once every key refused so far has parked (the upstream's retries count one
    # each), not while loops that were just refused are still ending: under load (a full
    # suite beside other runs) those pushed the slope to 2,056 B a key once.
    samples = await feed_and_measure(agent, keys, lambda: len(fake_segment.requests),
                                     segment_request,
                                     lambda: retries(agent) >= len(fake_segment.requests))
    assert not fake_segment.events
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/status") as r:
        snap = await r.json()
    assert [(u["state"], u["keys"], u["queue_depth"]) for u in snap["upstreams"]] == [
        ("backoff", keys, keys)]
    assert "503" in snap["upstreams"][0]["last_error"]
    # The upstream is back; `outpost flush` cuts every key's wait short at once.
    fake_segment.outage = None
    code, out = await run_outpost("flush", "--config", str(cfg))
    assert code == 0, out
    # One request per key: 8k requests took under 20 s on a quiet 2-core machine (CI) but
    # 2-3x that while it is shared (failed 2 runs in 3 at load 10-13). A stuck forwarder
    # still fails here; the chunked feed above is what catches quadratic costs.
    await wait_for(lambda: len(fake_segment.events) >= keys, timeout=DRAIN_TIMEOUT_S)
    assert sorted(fake_segment.message_ids()) == sorted(f"m{i}" for i in range(keys))
    await wait_for(lambda: read_offline(tmp_path / "spool.db")["depth"] == 0)
    agent.terminate()
    check_costs(samples, agent.log.read_text(), OUTAGE_KEY_BYTES)


class HeldCloseUpstream:
    """A Nucleus websocket upstream that acks every event but, once told to, holds
    each close handshake open: the agent's released loop is then still closing."""

    def __init__(self) -> None:
        self.ids: list[Any] = []
        self.connections = 0
        self.closes_held = 0
        self.hold = asyncio.Event()
        self.let_go = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self.port = 0

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoclose=False)
        await ws.prepare(request)
        self.connections += 1
        self._sockets.add(ws)
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.TEXT:
                ids = [ev["id"] for ev in orjson.loads(msg.data)["data"] if "id" in ev]
                self.ids += ids
                await ws.send_str(orjson.dumps({"reportedIds": ids}).decode())
                continue
            if msg.type == WSMsgType.CLOSE and self.hold.is_set():
                self.closes_held += 1
                await self.let_go.wait()
            await ws.close()
            return ws

    async def start(self) -> HeldCloseUpstream:
        app = web.Application()
        app.add_routes([web.get("/app/{appId}/track", self._ws)])
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        self.let_go.set()
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()


async def post_events(port: int, key: str, ids: range) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{port}/app/{key}/track",
            json={"data": [{"type": "event", "name": "e", "id": i, "sessionId": 1}
                           for i in ids]}) as r:
        assert r.status == 200, await r.text()


async def post_event(port: int, key: str, event_id: int) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{port}/app/{key}/track",
            json={"data": [{"type": "event", "name": "e", "id": event_id, "sessionId": 1}]}) as r:
        assert r.status == 200, await r.text()


async def test_data_for_a_key_whose_loop_is_still_closing_starts_a_fresh_loop(
        make_agent: Callable[..., Any]) -> None:
    upstream = await HeldCloseUpstream().start()
    try:
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": "nucleus-ws", "url": f"ws://127.0.0.1:{upstream.port}",
            "flush_interval_s": 0.05}])
        upstream.hold.set()
        await post_event(agent.port, "app-one", 1)
        # Delivered, then idle: the loop is released and waits on its close handshake.
        await wait_for(lambda: upstream.closes_held == 1)
        await post_event(agent.port, "app-one", 2)
        # Not lost to the ending loop: a fresh one delivers it over a new connection.
        await wait_for(lambda: upstream.ids == [1, 2])
        assert upstream.connections == 2
        upstream.let_go.set()
        await wait_for(lambda: not agent.forwarding.loops and agent.spool.depth == 0)
    finally:
        await upstream.stop()


async def test_data_during_the_idle_wait_keeps_the_loop_and_its_connection(
        make_agent: Callable[..., Any]) -> None:
    upstream = await HeldCloseUpstream().start()
    try:
        # One event is a full batch: sent at once, while the idle wait before a release
        # (flush_interval_s) is long enough for the next post to land inside it.
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": "nucleus-ws", "url": f"ws://127.0.0.1:{upstream.port}",
            "flush_interval_s": 5, "batch_max_events": 1}])
        await post_event(agent.port, "app-one", 1)
        await wait_for(lambda: upstream.ids == [1] and agent.spool.depth == 0)
        await post_event(agent.port, "app-one", 2)
        await wait_for(lambda: upstream.ids == [1, 2])
        assert upstream.connections == 1
    finally:
        await upstream.stop()


async def test_events_at_the_moment_loops_release_are_all_delivered(
        make_agent: Callable[..., Any], fake_segment: FakeSegment) -> None:
    """Posts spaced around the idle time, so that many land while a loop is deciding to
    end, is ending, or has just ended (bounded: 200 events, ~2 s)."""
    agent = await make_agent(upstreams=[{"name": "up", "protocol": "segment-http",
                                         "url": fake_segment.url, "flush_interval_s": 0.01}])
    rng = random.Random(9)
    keys = [key_of(i) for i in range(3)]
    async with aiohttp.ClientSession() as s:
        for i in range(200):
            auth = base64.b64encode(f"{rng.choice(keys)}:".encode()).decode()
            async with s.post(f"http://127.0.0.1:{agent.port}/v1/track",
                              json={"event": "e", "userId": "u", "messageId": f"m{i}"},
                              headers={"Authorization": f"Basic {auth}"}) as r:
                assert r.status == 200
            await asyncio.sleep(rng.uniform(0, 0.02))  # pacing the load, not a wait
    await wait_for(lambda: len(fake_segment.events) >= 200)
    assert sorted(fake_segment.message_ids()) == sorted(f"m{i}" for i in range(200))
    await wait_for(lambda: not agent.forwarding.loops and agent.spool.depth == 0)


async def flush(port: int) -> None:
    async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{port}/flush") as r:
        assert r.status == 200, await r.text()


async def test_keys_that_all_resume_at_once_run_a_bounded_number_of_loops(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """A flush (or an upstream's return, or a start) with many keys waiting started a
    loop, an uplink and a websocket for every one of them at once, ~10 KB each whatever
    the number of keys an app invented. At most ``max_loops`` (MAX_LOOPS) run per
    upstream now, the others in line; a loop whose queue is empty ends at once while keys
    wait for one: here flush_interval_s is a minute, which lingering loops would hold
    the line for. (Before: with 64 keys and a bound of 4, 64 websockets open at once.)"""
    cap, keys = 8, 60
    fake_nucleus.outage = (503, "3600")   # each key's handshake refused once, then it waits
    agent = await make_agent(seams=Seams(max_loops=cap),
                             upstreams=[{"name": "up", "protocol": "nucleus-ws",
                                         "url": fake_nucleus.url, "flush_interval_s": 60}])
    for i in range(keys):
        await post_event(agent.port, key_of(i), i)
    await flush(agent.port)   # each key tries now, cap at a time, and is refused
    # Each key's first handshake was refused: every one waits out the hour, none has a loop.
    await wait_for(lambda: fake_nucleus.refused == keys and not agent.forwarding.loops,
                   timeout=DRAIN_TIMEOUT_S)
    fake_nucleus.outage = None
    await flush(agent.port)
    # Well within one flush_interval_s: the keys in line are sent at once as their turn
    # comes (the flush asked for them too), and do not wait for loops to linger.
    await wait_for(lambda: agent.spool.depth == 0, timeout=30)
    assert sorted(fake_nucleus.ids()) == list(range(keys))
    assert fake_nucleus.most_open <= cap, fake_nucleus.most_open


async def test_keys_that_never_empty_their_queue_give_their_turn_to_keys_in_line(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """With loops bounded, keys whose queues never empty (posted to faster than a slow
    upstream takes) would hold every loop for good and keep a key in line out: each gives
    its turn after two flush intervals while others wait, and goes to the back."""
    fake_nucleus.delay_s = 0.05   # 20 frames a second, of at most 5 events each
    agent = await make_agent(seams=Seams(max_loops=2),
                             upstreams=[{"name": "up", "protocol": "nucleus-ws",
                                         "url": fake_nucleus.url, "flush_interval_s": 0.2,
                                         "batch_max_events": 5}])
    busy = asyncio.Event()

    async def feed(key: str, first: int) -> None:
        for i in range(first, first + 2_000, 20):   # 20 events every 20 ms: ~1,000 a second
            await post_events(agent.port, key, range(i, i + 20))
            busy.set()
            await asyncio.sleep(0.02)

    feeders = [asyncio.create_task(feed(key_of(k), k * 100_000)) for k in (0, 1)]
    try:
        await busy.wait()
        await wait_for(lambda: len(agent.forwarding.loops) == 2)
        await post_event(agent.port, key_of(2), 999_999)
        await wait_for(lambda: 999_999 in fake_nucleus.ids(), timeout=15)
        assert not all(f.done() for f in feeders), "the busy keys stopped before it went"
    finally:
        for f in feeders:
            f.cancel()
        await asyncio.gather(*feeders, return_exceptions=True)
