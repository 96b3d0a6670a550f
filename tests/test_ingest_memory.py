"""Memory under the largest posts each API allows: bounded peak, admission control, and
memory handed back once the load is over."""

from __future__ import annotations

import asyncio
import gzip
import os
import platform
import re
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
from aiohttp import WSCloseCode, WSMsgType

from bench.procs import high_water, reset_peak
from tests.conftest import AgentProcess, free_port, write_config
from tests.load_bodies import BASIC, KEY, ROUTES, Route, nucleus_body
from tests.waiting import run_outpost, wait_for

MB = 1024 * 1024
PEAK_LIMIT = 150 * MB
SETTLED_OVER_IDLE = 15 * MB
CONCURRENT = 8


class RssSampler:
    """The agent's resident set size: now, and its peak while ``running``, by the kernel's
    high-water mark (exact: a peak that came and went between two samples counts), beside
    a sample every 5 ms on a thread of its own (the test's event loop is busy building
    bodies and reading replies)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.sampled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    @property
    def peak(self) -> int:
        return max(self.sampled, high_water(self.proc.pid))

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, self.rss())

    @contextmanager
    def running(self) -> Iterator[RssSampler]:
        reset_peak(self.proc.pid)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(5)


def offline_agent(tmp_path: Path, agent_process: Callable[..., AgentProcess],
                  **listen: Any) -> AgentProcess:
    """An `outpost run` subprocess whose upstream is down: pure ingest."""
    port = free_port()
    # The dedupe index is kept by design (~90 B per key received in the window, ~130 B at
    # the peak of its table's rebuild; up to storage.dedupe_max_keys: docs/operations.md);
    # bounded small here, so that what is measured is the memory of ingest itself, which
    # must be handed back.
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                       listen=listen, storage={"dedupe_max_keys": 10_000}, upstreams=[{
                           "name": "n", "protocol": "nucleus-ws",
                           "url": f"ws://127.0.0.1:{free_port()}"}])
    return agent_process(cfg, port).start()


async def metric(s: aiohttp.ClientSession, base: str, name: str) -> float:
    async with s.get(base + "/metrics") as r:
        text = await r.text()
    found = re.search(rf"^outpost_{name} (\S+)$", text, re.MULTILINE)
    assert found, f"no {name} in /metrics"
    return float(found.group(1))


async def post_all(s: aiohttp.ClientSession, base: str, route: Route,
                   bodies: list[bytes]) -> list[tuple[int, Any, str | None]]:
    async def one(body: bytes) -> tuple[int, Any, str | None]:
        async with s.post(base + route.path, data=body, headers=route.headers) as r:
            raw = await r.read()
            return r.status, orjson.loads(raw) if raw else None, r.headers.get("Retry-After")
    return list(await asyncio.gather(*(one(b) for b in bodies)))


def check_replies(route: Route, replies: list[tuple[int, Any, str | None]]) -> int:
    """Every reply is a success or the API's own busy answer; returns the successes."""
    ok = 0
    for status, body, retry_after in replies:
        if status == route.ok:
            ok += 1
            continue
        assert status == route.busy, (route.name, status, body)
        assert retry_after is not None and int(retry_after) >= 1, (route.name, body)
        assert route.busy_shape(body), (route.name, body)
    assert ok >= 1, f"{route.name}: not one of {len(replies)} posts was admitted"
    return ok


async def ws_all(s: aiohttp.ClientSession, base: str, frames: list[bytes]) -> int:
    """One max-size frame per connection; each is acknowledged or closed 'try again later'."""
    async def one(frame: bytes) -> int:
        async with s.ws_connect(base + f"/app/{KEY}/track", max_msg_size=0) as ws:
            await ws.send_bytes(frame)
            msg = await ws.receive(timeout=60)
            if msg.type == WSMsgType.TEXT:
                assert len(orjson.loads(msg.data)["reportedIds"]) == frame.count(b'"id"')
                return 1
            assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED), msg
            assert ws.close_code == WSCloseCode.TRY_AGAIN_LATER, (ws.close_code, msg)
            return 0
    return sum(await asyncio.gather(*(one(f) for f in frames)))


async def test_peak_rss_with_eight_max_size_posts_on_every_route(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    agent = offline_agent(tmp_path, agent_process)
    assert agent.proc is not None
    base = agent.url
    sampler = RssSampler(agent.proc.pid)
    async with aiohttp.ClientSession() as s:
        # Idle: serving, warmed by a small request, no load.
        async with s.post(base + f"/app/{KEY}/track", json={"data": [{"id": 1}]}) as r:
            assert r.status == 200
        idle = sampler.rss()
        admitted = 0
        peaks = {}
        with sampler.running():
            for n, route in enumerate(ROUTES):
                bodies = [route.body(n * 100 + i) for i in range(CONCURRENT)]
                admitted += check_replies(route, await post_all(s, base, route, bodies))
                peaks[route.name] = sampler.peak
            frames = [nucleus_body(900 + i) for i in range(CONCURRENT)]
            admitted += await ws_all(s, base, frames)
            peaks["nucleus-ws"] = sampler.peak
        print(f"idle {idle / MB:.0f} MB, running peak after each route (MB): "
              + ", ".join(f"{k} {v / MB:.0f}" for k, v in peaks.items())
              + f"; {admitted} of {CONCURRENT * (len(ROUTES) + 1)} posts admitted")
        assert sampler.peak <= PEAK_LIMIT, f"peak RSS {sampler.peak / MB:.0f} MB"
        # Once nothing is in flight the agent hands the freed memory back (malloc_trim).
        assert await metric(s, base, "ingest_inflight_bytes") == 0
        settled = await settles(sampler, idle + SETTLED_OVER_IDLE)
        trims = await metric(s, base, "memory_trims_total")
        print(f"settled at {settled / MB:.0f} MB (idle {idle / MB:.0f} MB) after {trims:.0f} "
              "trims")
        assert settled <= idle + SETTLED_OVER_IDLE, (
            f"RSS stayed at {settled / MB:.0f} MB, idle was {idle / MB:.0f} MB")


async def settles(sampler: RssSampler, target: int, timeout: float = 10.0) -> int:
    """The agent's RSS once it is at most ``target``, or after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (rss := sampler.rss()) > target and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return rss


async def hold_budget(agent: Any) -> asyncio.StreamWriter:
    """Hold an agent's whole in-flight budget of 1 MiB: a post that declares 1 MiB and sends
    only its first bytes. Closing the writer gives it back."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    writer.write((f"POST /app/{KEY}/track HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Content-Length: {MB}\r\n\r\n").encode() + b'{"data": [')
    await writer.drain()
    await wait_for(lambda: agent.metrics.inflight_bytes == MB)
    return writer


async def test_admission_refuses_in_each_api_shape_once_over_budget(make_agent: Any) -> None:
    """A post that would take in-flight bodies over [listen] max_inflight_mb is refused
    before its body is read, with the API's busy status, shape and Retry-After; nothing
    of it is stored, and once the budget frees the same post is taken."""
    agent = await make_agent(listen={"max_inflight_mb": 1})
    writer = await hold_budget(agent)
    base = f"http://127.0.0.1:{agent.port}"
    async with aiohttp.ClientSession() as s:
        for n, route in enumerate(ROUTES):
            body = route.body(n)
            replies = await post_all(s, base, route, [body])
            status, reply, retry_after = replies[0]
            assert status == route.busy, (route.name, status, reply)
            assert retry_after == "1" and route.busy_shape(reply), (route.name, reply)
        async with s.ws_connect(base + f"/app/{KEY}/track") as ws:
            await ws.send_str('{"data": [{"type": "event", "name": "e", "id": 1}]}')
            msg = await ws.receive(timeout=10)
            assert msg.type == WSMsgType.CLOSE and ws.close_code == WSCloseCode.TRY_AGAIN_LATER
        assert agent.spool.depth == 0, "a refused post left events behind"
        assert agent.metrics.busy_refusals == len(ROUTES) + 1
        # The client that held the budget goes away: its reservation goes with it.
        writer.close()
        await wait_for(lambda: agent.metrics.inflight_bytes == 0)
        # Posts larger than the whole budget (4 MiB Nucleus) are taken when alone.
        expected = 0
        for n, route in enumerate(ROUTES):
            body = route.body(50 + n)
            status, reply, _ = (await post_all(s, base, route, [body]))[0]
            assert status == route.ok, (route.name, status, reply)
            expected += events_in(body)
    assert agent.spool.depth == expected  # each post stored whole
    assert agent.metrics.inflight_bytes == 0


def events_in(body: bytes) -> int:
    doc = orjson.loads(body)
    items = doc.get("data", doc.get("batch"))
    return len(items) if isinstance(items, list) else 1


@pytest.mark.parametrize("value,problem", [("0", "must be greater than 0"), ("-1", "must be greater than 0"),
                                           ("true", "got a boolean"), ('"8"', "expected")])
async def test_budget_is_validated_at_startup(tmp_path: Path, value: str, problem: str) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"[listen]\nmax_inflight_mb = {value}\n")
    code, out = await run_outpost("check-config", str(cfg))
    assert code != 0 and "listen.max_inflight_mb" in out and problem in out, out


async def test_a_lone_post_over_the_budget_is_taken_gzipped_or_chunked(make_agent: Any) -> None:
    """The budget refuses posts only while others are in flight: a lone post larger
    than it is taken, however it arrives (its own reservations do not count against it)."""
    agent = await make_agent(listen={"max_inflight_mb": 1})
    body = nucleus_body(1, limit=2 * MB)
    base = f"http://127.0.0.1:{agent.port}/app/{KEY}/track"

    async def chunks() -> Any:
        for at in range(0, len(body), 65536):
            yield body[at:at + 65536]

    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(base, data=gzip.compress(body),
                          headers={"Content-Encoding": "gzip"}) as r:
            assert r.status == 200, await r.text()
        async with s.post(base, data=chunks()) as r:  # no Content-Length: chunked
            assert r.status == 200, await r.text()
    assert agent.spool.depth == events_in(body)  # the second post is all resends
    assert agent.metrics.busy_refusals == 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the C allocator switch is for glibc")
def test_outpost_run_switches_to_the_c_allocator_unless_told_otherwise(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """Same pid (a service manager sees nothing), PYTHONMALLOC=malloc; an explicit
    PYTHONMALLOC is kept."""
    cases = [({"PYTHONMALLOC": "pymalloc"}, "pymalloc")]
    if "PYTHONMALLOC" not in os.environ:
        cases.append(({}, "malloc"))
    for env, expected in cases:
        port = free_port()
        cfg = write_config(tmp_path / f"{expected}.toml", tmp_path / f"{expected}.db", port=port)
        agent = agent_process(cfg, port, env=env)
        agent.start()
        assert agent.proc is not None
        assert psutil.Process(agent.proc.pid).environ().get("PYTHONMALLOC") == expected
        assert agent.terminate() == 0


async def test_bad_events_of_many_invented_app_ids_do_not_pile_up_in_memory(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """A Nucleus event with a problem of its own is logged at most once a minute per app:
    the rate limiter kept every app id it saw within that minute, whole, past its 1,024
    keys, and an app id may be as long as the request line (64 KiB). A local process
    inventing app ids (accept_keys empty, the default) grew the agent by 60 KB a request,
    94 MB in 3 s, some 2 GB by the end of the minute; the routes' memo (limits.py) kept
    4,096 of them whole too (256 MiB). Nothing of these events is stored. Such ids are
    now refused before their events are read (an invented key is at most 256 characters),
    and they must still cost nothing."""
    agent = offline_agent(tmp_path, agent_process)
    assert agent.proc is not None
    sampler = RssSampler(agent.proc.pid)
    body = orjson.dumps({"data": [{"id": 1, "name": 5}]})   # a name that is not a string
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{agent.url}/app/{KEY}/track", data=body) as r:
            assert r.status == 200 and await r.json() == {"reportedIds": []}
        idle = sampler.rss()
        for i in range(1500):
            async with s.post(f"{agent.url}/app/{i:06d}{'k' * 60_000}/track", data=body) as r:
                assert r.status == 401 and "longer than 256" in (await r.json())["error"]
        grown = sampler.rss() - idle
    assert grown <= SETTLED_OVER_IDLE, f"RSS grew {grown / MB:.0f} MB"


async def test_a_small_gzip_batch_is_taken_beside_a_large_post_in_flight(make_agent: Any) -> None:
    """A gzip body is charged to the in-flight budget as it inflates, not its 4 MiB worst
    case (the batch limit) up front: with 4 MiB of another post in flight under a 6 MiB
    budget, a small gzip batch (a SDK's with gzip on) is taken, not refused busy."""
    agent = await make_agent(listen={"max_inflight_mb": 6})
    _reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    writer.write((f"POST /app/{KEY}/track HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Content-Length: {4 * MB}\r\n\r\n").encode() + b'{"data": [')
    await writer.drain()
    await wait_for(lambda: agent.metrics.inflight_bytes == 4 * MB)
    batch = orjson.dumps({"batch": [{"type": "track", "event": "e", "userId": "u"}]})
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.post(f"http://127.0.0.1:{agent.port}/v1/batch",
                              data=gzip.compress(batch), headers={
                                  "Content-Encoding": "gzip", "Authorization": "Basic azo="}) as r:
                assert r.status == 200, await r.text()
    finally:
        writer.close()
    assert agent.spool.depth == 1 and agent.metrics.busy_refusals == 0


def tiny_events(n: int) -> bytes:
    """A Nucleus message of ``n`` events of a few bytes each (ids, so none is a resend)."""
    return b'{"data":[' + b",".join(b'{"id":%d}' % i for i in range(n)) + b"]}"


async def test_a_nucleus_message_of_more_events_than_4_mib_holds_is_refused(
        make_agent: Any) -> None:
    """An event held until its commit takes ~450 bytes (its parsed object, its Event, its
    enriched body) however few bytes it came as: one 4 MiB post of `{}` (1.4 million
    events) took an `outpost run` to +640 MB for 10 s. An event counts as at least 32
    bytes of the 4 MiB a message may be: one of more events is refused whole."""
    agent = await make_agent()
    body = tiny_events(MB * 4 // 32 + 1)   # 1.2 MB
    base = f"http://127.0.0.1:{agent.port}/app/{KEY}/track"
    why = "over 131,072 events in one message: too many to take"
    async with aiohttp.ClientSession() as s:
        async with s.post(base, data=body) as r:
            assert r.status == 413, (await r.text())[:200]
            assert (await r.json())["error"].startswith(why)
        async with s.ws_connect(base) as ws:
            await ws.send_bytes(body)
            msg = await ws.receive(timeout=10)
            assert msg.type == WSMsgType.CLOSE, msg
            assert ws.close_code == WSCloseCode.MESSAGE_TOO_BIG
            assert msg.extra.startswith(why)
    assert agent.spool.depth == 0


async def test_an_event_counts_at_least_128_bytes_against_the_in_flight_budget(
        make_agent: Any) -> None:
    """Events of a few bytes, charged by their bytes alone, let a budget of 6 MiB hold
    about 700,000 events waiting for their commit (300 MB); at 32 bytes each, 100 apps
    posting 4,000 such events at a time still took an `outpost run` 138 MB past idle.
    Each counts 128 bytes, as a Segment message does."""
    agent = await make_agent(listen={"max_inflight_mb": 1})
    _reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    writer.write((f"POST /app/{KEY}/track HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Content-Length: {MB // 2}\r\n\r\n").encode() + b'{"data": [')
    await writer.drain()
    await wait_for(lambda: agent.metrics.inflight_bytes == MB // 2)
    body = tiny_events(6_000)   # 70 KB, 192 KB at 32 bytes an event: under the budget
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{agent.port}/app/{KEY}/track",
                              data=body) as r:   # counted as 768,000 bytes: over it
                assert r.status == 503, (await r.text())[:200]
                assert r.headers["Retry-After"] == "1"
    finally:
        writer.close()
    await wait_for(lambda: agent.metrics.inflight_bytes == 0)
    async with aiohttp.ClientSession() as s:   # alone, it is taken
        async with s.post(f"http://127.0.0.1:{agent.port}/app/{KEY}/track", data=body) as r:
            assert r.status == 200, (await r.text())[:200]
    assert agent.spool.depth == 6_000 and agent.metrics.inflight_bytes == 0


def tiny_messages(seed: int, n: int = 2500) -> bytes:
    """A Segment batch of ``n`` messages of about 45 bytes each, every one with its own
    messageId (Tranthor's batches need one)."""
    return b'{"batch":[' + b",".join(b'{"type":"page","userId":"u","messageId":"%d-%d"}'
                                    % (seed, i) for i in range(n)) + b"]}"


async def test_a_segment_message_counts_at_least_128_bytes_against_the_in_flight_budget(
        make_agent: Any) -> None:
    """A message of 33 bytes holds about 1 KB until its commit (its messageId and times
    added, its Event, its row): counted by its bytes alone, 100 apps posting batches of
    2,000 such messages took an `outpost run` 186 MB past idle within the default 6 MiB
    budget. Each message of a batch, on every batch route, counts 128 bytes at least."""
    agent = await make_agent(listen={"max_inflight_mb": 1})
    _reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    held = MB - 200_000
    writer.write((f"POST /app/{KEY}/track HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Content-Length: {held}\r\n\r\n").encode() + b'{"data": [')
    await writer.drain()
    await wait_for(lambda: agent.metrics.inflight_bytes == held)
    routes = [r for r in ROUTES if r.name in ("batch", "import", "webhook", "capture", "tranthor")]
    base = f"http://127.0.0.1:{agent.port}"
    try:
        async with aiohttp.ClientSession() as s:
            for n, route in enumerate(routes):
                body = tiny_messages(n)   # 120 KB: with those held, under the budget
                (status, reply, retry_after), = await post_all(s, base, route, [body])
                assert status == route.busy, (route.name, status, str(reply)[:200])
                assert retry_after == "1" and route.busy_shape(reply), (route.name, reply)
    finally:
        writer.close()
    await wait_for(lambda: agent.metrics.inflight_bytes == 0)
    async with aiohttp.ClientSession() as s:   # alone, a batch is taken
        (status, reply, _), = await post_all(s, base, routes[0], [tiny_messages(99)])
        assert status == routes[0].ok, str(reply)[:200]
    assert agent.spool.depth == 2500 and agent.metrics.inflight_bytes == 0


async def test_the_events_kept_of_a_websocket_message_over_4_mib_count_128_bytes_each(
        make_agent: Any) -> None:
    """A websocket message over 4 MiB is charged the 4 MiB it may keep, from its first
    byte; the events it keeps count 128 bytes each of it (its first alone counts its own
    bytes), as every route's events count against the budget. Counted 32 bytes each, one
    message of `{"id":n}` kept 131,072 of them: an `outpost run` went 133 MB past idle for
    it alone, and eight connections under a 24 MiB budget 373 MB (42 and 101 MB now)."""
    agent = await make_agent()
    # 40,000 events of a dozen bytes, past 4 MiB by another member of the message
    body = b'{"pad":"' + b"x" * (4 * MB - 100) + b'",' + tiny_events(40_000)[1:]
    async with aiohttp.ClientSession() as s, s.ws_connect(
            f"http://127.0.0.1:{agent.port}/app/{KEY}/track") as ws:
        await ws.send_bytes(body)
        msg = await ws.receive(timeout=30)
    assert msg.type == WSMsgType.TEXT, str(msg)[:200]
    kept = 1 + (2 * MB - len(b'{"id":0},')) // 128   # of the first 2 MiB: the rest is resent
    assert orjson.loads(msg.data)["reportedIds"] == list(range(kept))
    assert agent.spool.depth == kept


def empty_objects(field: bytes, size: int = 4 * MB, item: bytes = b"{}") -> bytes:
    """A body of ``size`` bytes whose array ``field`` holds ``item`` again and again."""
    head, tail = b'{"%s":[' % field, b"]}"
    n = (size - len(head) - len(tail) + 1) // (len(item) + 1)
    return head + b",".join([item] * n) + tail


async def test_a_body_dense_in_objects_is_refused_before_it_is_parsed(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """Parsed, every `{}` or `[]` is a Python object of 70-100 bytes: 4 MiB of them, 1.4
    million, took an `outpost run` 150 MB past idle while it parsed them, before any of
    its limits on events could apply (a real 4 MiB message, 38,000 Nucleus events, takes
    about 20 MB). A body holding more than 262,144 objects and arrays (one per 16 bytes of
    the 4 MiB it may be) is refused (413) unparsed, on every route that takes large
    bodies, and closes a Nucleus websocket with 1009."""
    agent = offline_agent(tmp_path, agent_process)
    assert agent.proc is not None
    sampler = RssSampler(agent.proc.pid)
    posts = [(f"/app/{KEY}/track", {}, empty_objects(b"data")),
             (f"/app/{KEY}/track", {}, empty_objects(b"data", item=b"[]")),
             ("/v1/batch", BASIC, empty_objects(b"batch"))]
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{agent.url}/app/{KEY}/track", json={"data": [{"id": 1}]}) as r:
            assert r.status == 200
        idle = sampler.rss()
        replies = []
        with sampler.running():
            for path, headers, body in posts:
                async with s.post(agent.url + path, data=body, headers=headers) as r:
                    replies.append((path, r.status, await r.text()))
            async with s.ws_connect(f"{agent.url}/app/{KEY}/track") as ws:
                await ws.send_bytes(posts[0][2])
                msg = await ws.receive(timeout=30)
    grown = sampler.peak - idle
    assert grown <= 40 * MB, f"peak RSS {grown / MB:.0f} MB over idle"
    for path, status, reply in replies:
        assert status == 413 and "objects and arrays" in reply, (path, status, reply[:300])
    assert msg.type == WSMsgType.CLOSE and msg.data == WSCloseCode.MESSAGE_TOO_BIG, msg
    assert "objects and arrays" in msg.extra, msg


CHUNKED_BATCH = (b"POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                 + BASIC["Authorization"].encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")


def one_byte_chunks(body: bytes) -> bytes:
    return b"".join(b"1\r\n%c\r\n" % c for c in body) + b"0\r\n\r\n"


def spaces(n: int) -> bytes:
    """A batch of no message: ``n`` spaces between its brackets."""
    return b'{"batch": [' + b" " * n + b"]}"


async def status_of_reply(reader: asyncio.StreamReader) -> int:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    assert length is not None, head
    await reader.readexactly(int(length.group(1)))
    return int(head.split()[1])


async def peak_of_200_connections(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        one: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[list[int]]]
) -> None:
    """200 connections to an offline agent at once, each doing ``one``: every reply a
    success (an empty batch) or busy, and the agent's peak RSS within 60 MB of its idle."""
    agent = offline_agent(tmp_path, agent_process)
    assert agent.proc is not None
    sampler = RssSampler(agent.proc.pid)

    async def connection() -> list[int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        try:
            return await one(reader, writer)
        finally:
            writer.close()

    async with aiohttp.ClientSession() as s:
        async with s.post(f"{agent.url}/app/{KEY}/track", json={"data": [{"id": 1}]}) as r:
            assert r.status == 200
    idle = sampler.rss()
    with sampler.running():
        statuses = await asyncio.gather(*(connection() for _ in range(200)))
    grown = sampler.peak - idle
    seen = {s for replies in statuses for s in replies}
    print(f"peak {grown / MB:.0f} MB past idle; replies {sorted(seen)}")
    assert seen <= {200, 503}, statuses
    assert grown <= 60 * MB, f"peak RSS {grown / MB:.0f} MB past idle"


async def test_bodies_sent_in_one_byte_chunks_cost_what_larger_chunks_do(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """A chunked body's every chunk becomes an object of aiohttp's, about 100 bytes for a
    chunk of one byte, and aiohttp read up to 16,384 of a body's chunks ahead of its route
    before it paused: about 1 MB a connection for 10-16 KB of body, which the in-flight
    budget had yet to see. 200 connections each sending a 20 KB batch in 1-byte chunks took
    the agent about 210 MB past idle at its peak (500 of them 430 MB, so about 1 GB at
    listen.max_connections); the same batches in one chunk each, 6 MB."""
    sent = CHUNKED_BATCH + one_byte_chunks(spaces(20_000))

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[int]:
        writer.write(sent)
        await writer.drain()
        return [await status_of_reply(reader)]

    await peak_of_200_connections(tmp_path, agent_process, one)


async def test_a_body_in_one_byte_chunks_sent_ahead_behind_one_of_many_chunks_costs_no_more(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """As above, each batch in 1-byte chunks now the second request of its connection, its
    head sent ahead of the first's answer behind a body of 100 chunks, its body once that
    answer came. The first body's chunks past the 64 read ahead of its route wait in the
    HTTP library's parser with the second head, which it parses there itself: the second
    body was read up to the library's own 16,384 chunks ahead of its route, not 64: 200
    such connections peaked 150-170 MB past idle (about 30 MB with the bound)."""
    first = CHUNKED_BATCH + one_byte_chunks(spaces(100)) + CHUNKED_BATCH
    second = one_byte_chunks(spaces(20_000))
    answered = 0
    all_answered = asyncio.Event()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[int]:
        nonlocal answered
        writer.write(first)
        status = await status_of_reply(reader)
        answered += 1
        if answered == 200:   # the second bodies all at once, as the batches above
            all_answered.set()
        await all_answered.wait()
        writer.write(second)
        await writer.drain()
        return [status, await status_of_reply(reader)]

    await peak_of_200_connections(tmp_path, agent_process, one)


async def test_a_body_in_one_byte_chunks_sent_in_one_write_behind_one_of_many_chunks_costs_no_more(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """As above, the second request's head and body sent in the same write as the first,
    whose body of 3,000 chunks ends past the 16 KiB piece it pauses in. The connection handed
    aiohttp the rest of the read piece by piece, which its parser, paused, kept whole and
    parsed itself as the first route read on: the second head unseen, and its body's chunks
    up to its own 16,384 ahead of their route. 200 such connections peaked 170 MB past idle."""
    sent = b"".join(CHUNKED_BATCH + one_byte_chunks(spaces(n)) for n in (3_000, 20_000))

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[int]:
        writer.write(sent)
        await writer.drain()
        return [await status_of_reply(reader), await status_of_reply(reader)]

    await peak_of_200_connections(tmp_path, agent_process, one)
