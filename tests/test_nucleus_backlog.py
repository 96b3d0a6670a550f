"""A Nucleus module's whole queue in one websocket message larger than 4 MiB.

Modules keep their queue with no cap and send all of it in one message every tick, so
after the agent was away one message can be many MiB. It was closed with 1009, uncounted,
and the module resent it, growing, forever. Now such a message is taken up to a hard cap
(64 MiB): the agent stores and acknowledges the events of its first MiB or two and the
module resends the rest next tick, so each tick shrinks the queue. An id is acknowledged
only with every event of the message carrying it stored: the module drops every queued
event whose id is acknowledged. Over the cap, the message is closed with 1009, counted and
logged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSCloseCode, WSMsgType

from tests.fakes.nucleus_upstream import FakeNucleus
from tests.segment_helpers import nucleus_up, wait_for
from tests.test_ingest_memory import RssSampler, hold_budget, metric, offline_agent

MB = 1024 * 1024
HARD_CAP = 64 * MB   # the largest Nucleus websocket message taken (docs/design-extensions.md)
KEY = "k"


def module_queue(n: int, seed: int = 1, *, label: int = 300,
                 ids: int = 10_000) -> list[dict[str, Any]]:
    """``n`` events as a module queues them: small random ids that collide (the Python
    module draws them from 1..10000), one session, names some of which are not ASCII."""
    rng = random.Random(seed)
    names = ["plain", "café", "emoji 🚀", 'quote "q"']
    return [{"type": "event", "name": f"e{i} {names[i % 4]}", "id": rng.randint(1, ids),
             "date": "2026-12-01T08:00:00.000Z", "machineId": "m" * 32, "sessionId": 4242,
             "payload": {"i": i, "label": "x" * label}} for i in range(n)]


async def send_queue(ws: aiohttp.ClientWebSocketResponse, queue: list[dict[str, Any]],
                     encode: Any) -> list[Any]:
    """One tick of a module: the whole queue in one frame; the ids acknowledged."""
    await ws.send_str(encode({"data": queue}))
    reply = await ws.receive(timeout=60)
    assert reply.type == WSMsgType.TEXT, (reply, ws.close_code)
    acked: list[Any] = orjson.loads(reply.data)["reportedIds"]
    return acked


ENCODINGS = {
    # nucleus-python: json.dumps, ", " and ": " separators, non-ASCII escaped
    "python": json.dumps,
    # nucleus-nodejs: compact, UTF-8 as is; an older module's key before `data`
    "node": lambda msg: json.dumps({"confirmation": "c" * 100, **msg}, ensure_ascii=False,
                                   separators=(",", ":")),
}


# (how it is written, how many ids its events share: 1..10000 as nucleus-python draws
# them, or 1..300, each id then carried by about 37 events of the queue)
QUEUES = [("python", 10_000), ("node", 10_000), ("python", 300)]


async def test_a_queue_over_4_mib_drains_each_event_delivered_once(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    url = f"http://127.0.0.1:{agent.port}/app/{KEY}/track"
    sent: Counter[str] = Counter()
    for n, (how, ids) in enumerate(QUEUES):
        encode = ENCODINGS[how]
        queue = module_queue(11_000, seed=n, ids=ids)
        queue[-1]["id"] = queue[0]["id"]   # the first id, again in the last event
        for ev in queue:
            ev["name"] += f" {how} {ids}"
        sent.update(ev["name"] for ev in queue)
        assert len(encode({"data": queue})) > 5 * MB
        ticks = 0
        async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=0) as ws:
            while queue:
                ticks += 1
                assert ticks <= 10, f"{how} {ids}: {len(queue)} events left after 10 ticks"
                acked = await send_queue(ws, queue, encode)
                left = [ev for ev in queue if ev["id"] not in acked]   # as modules filter
                assert len(left) < len(queue), f"{how} {ids}: tick {ticks} took nothing"
                assert ticks > 1 or left, f"{how} {ids}: taken whole"
                queue = left
    await wait_for(lambda: len(fake_nucleus.events) >= sum(sent.values()), timeout=60)
    assert Counter(ev["name"] for ev in fake_nucleus.events) == sent


async def test_a_queue_headed_by_an_event_larger_than_what_a_tick_keeps_drains(
        make_agent: Any) -> None:
    """Each tick keeps the events of the first 2 MiB of a large message, but an event
    that any message may carry (up to 4 MiB) is never stuck at the head of the queue."""
    agent = await make_agent()
    queue = module_queue(11_000)
    queue[0]["payload"]["label"] = "x" * (3 * MB)
    url = f"http://127.0.0.1:{agent.port}/app/{KEY}/track"
    async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=0) as ws:
        for _tick in range(10):
            acked = await send_queue(ws, queue, json.dumps)
            queue = [ev for ev in queue if ev["id"] not in acked]
            if not queue:
                break
    assert not queue
    assert agent.spool.depth == 11_000


async def raw_websocket(port: int, path: str, ahead: bytes = b""
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket opened by hand, to send a frame header alone; ``ahead``: bytes sent
    with the upgrade request, before its answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode() + ahead)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_close(reader: asyncio.StreamReader, timeout: float = 10) -> tuple[int, str]:
    """The close frame the server sends: (code, reason)."""
    while True:
        first, second = await asyncio.wait_for(reader.readexactly(2), timeout)
        payload = await reader.readexactly(second & 0x7F)
        if first & 0x0F == 0x8:
            return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


def frame_head(length: int, mask: bytes = b"\0\0\0\0") -> bytes:
    """A masked, final text frame's header declaring ``length`` payload bytes."""
    return bytes([0x81, 0x80 | 127]) + struct.pack("!Q", length) + mask


async def test_a_message_over_the_hard_cap_is_closed_1009_counted_and_logged(
        make_agent: Any, caplog: Any) -> None:
    agent = await make_agent()
    caplog.set_level(logging.INFO)
    for _ in range(2):
        reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
        writer.write(frame_head(HARD_CAP + 1) + b'{"data":[' + b" " * 65536)
        code, reason = await read_close(reader)
        writer.close()
        assert code == WSCloseCode.MESSAGE_TOO_BIG, (code, reason)
        assert str(HARD_CAP) in reason or "64 MiB" in reason, reason
    assert agent.spool.depth == 0
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/metrics") as r:
            metrics = await r.text()
        async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
            status = await r.json()
    assert re.search(r'^outpost_ingest_refused_total\{api="nucleus",status="1009"\} 2$', metrics,
                     re.MULTILINE), metrics
    assert status["ingest"]["refused"]["nucleus"]["1009"] == 2
    # Logged, once for both (rate-limited), saying what it means and what to do.
    logged = [r.getMessage() for r in caplog.records if "64 MiB" in r.getMessage()]
    assert len(logged) == 1, logged
    assert "k***" in logged[0] and "queue" in logged[0], logged


async def test_a_message_sent_ahead_of_the_upgrade_answer_is_read_as_any(
        make_agent: Any) -> None:
    """Frames that come with the upgrade request, before its 101, are read by the same
    reader as the later ones: a small one is acknowledged, a large one taken apart."""
    agent = await make_agent()
    small = b'{"data":[{"type":"event","name":"ahead","id":7}]}'
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track",
                                         ahead=bytes([0x81, 0x80 | len(small)]) + b"\0" * 4
                                         + small)
    first, length = await asyncio.wait_for(reader.readexactly(2), 10)
    assert orjson.loads(await reader.readexactly(length)) == {"reportedIds": [7]}
    writer.close()
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track",
                                         ahead=frame_head(HARD_CAP + 1) + b'{"data":[')
    code, reason = await read_close(reader)
    writer.close()
    assert code == WSCloseCode.MESSAGE_TOO_BIG and "64 MiB" in reason, (code, reason)


async def test_a_large_message_that_is_not_json_is_refused_whole(make_agent: Any) -> None:
    """Past the events it stores, a large message is still read to its end: one that is not
    JSON is refused whole (1007), as a small one is, and nothing of it is stored."""
    agent = await make_agent()
    good = json.dumps({"data": module_queue(11_000)})
    last = good.rindex("}, {")
    broken = good[:last] + "} {" + good[last + 4:]   # a comma missing near the end
    url = f"http://127.0.0.1:{agent.port}/app/{KEY}/track"
    async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_str(broken)
        reply = await ws.receive(timeout=30)
        assert reply.type == WSMsgType.CLOSE, reply
        assert ws.close_code == WSCloseCode.INVALID_TEXT, ws.close_code
    assert agent.spool.depth == 0
    assert agent.metrics.refused[("nucleus", WSCloseCode.INVALID_TEXT)] == 1


async def test_a_large_message_is_charged_to_the_in_flight_budget(make_agent: Any) -> None:
    """While other bodies hold [listen] max_inflight_mb, a large message is refused busy
    (1013: the module resends it next tick) without being kept; alone, it is taken."""
    agent = await make_agent(listen={"max_inflight_mb": 1})
    holder = await hold_budget(agent)
    frame = json.dumps({"data": module_queue(11_000)})
    url = f"http://127.0.0.1:{agent.port}/app/{KEY}/track"
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url, max_msg_size=0) as ws:
            await ws.send_str(frame)
            reply = await ws.receive(timeout=30)
            assert reply.type == WSMsgType.CLOSE, reply
            assert ws.close_code == WSCloseCode.TRY_AGAIN_LATER, ws.close_code
        assert agent.spool.depth == 0
        assert agent.metrics.busy_refusals == 1
        holder.close()
        await wait_for(lambda: agent.metrics.inflight_bytes == 0)
        async with s.ws_connect(url, max_msg_size=0) as ws:
            await ws.send_str(frame)
            reply = await ws.receive(timeout=30)
            assert reply.type == WSMsgType.TEXT, reply
    assert agent.spool.depth > 0
    await wait_for(lambda: agent.metrics.inflight_bytes == 0)


async def test_a_large_message_is_charged_from_its_first_byte_and_freed_if_cut_short(
        make_agent: Any) -> None:
    """The events a large message may keep are charged as soon as its header is in; a
    module that goes away mid-message leaves nothing charged, and the agent serves on."""
    agent = await make_agent()
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    writer.write(frame_head(10 * MB) + b'{"data":[')
    await writer.drain()
    await wait_for(lambda: agent.metrics.inflight_bytes == 4 * MB)
    writer.close()
    await wait_for(lambda: agent.metrics.inflight_bytes == 0)
    url = f"http://127.0.0.1:{agent.port}/app/{KEY}/track"
    async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=0) as ws:
        acked = await send_queue(ws, module_queue(11_000), json.dumps)
        assert acked
    assert agent.spool.depth > 0
    await wait_for(lambda: agent.metrics.inflight_bytes == 0)


async def test_a_30_mb_message_is_taken_without_being_held_whole(
        tmp_path: Path, agent_process: Any) -> None:
    """The agent's memory does not grow with the message: a 30 MB queue is read as it
    arrives, keeping only the events it stores (an `outpost run` process). Ids drawn as
    nucleus-nodejs draws them (1..1e6): 2 MiB of events are kept (where ids repeat
    through the queue, up to 4 MiB: as much as a 4 MiB message takes)."""
    agent = offline_agent(tmp_path, agent_process)
    assert agent.proc is not None
    frame = json.dumps({"data": module_queue(60_000, label=400, ids=1_000_000)},
                       ensure_ascii=False)
    assert len(frame) > 30 * MB
    sampler = RssSampler(agent.proc.pid)
    url = agent.url + f"/app/{KEY}/track"
    async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_str('{"data":[{"type":"event","name":"warm","id":1}]}')
        assert (await ws.receive(timeout=10)).type == WSMsgType.TEXT
        idle = sampler.rss()
        with sampler.running():
            await ws.send_str(frame)
            reply = await ws.receive(timeout=60)
        assert reply.type == WSMsgType.TEXT, (reply, ws.close_code)
        assert orjson.loads(reply.data)["reportedIds"]
    grew = sampler.peak - idle
    print(f"idle {idle / MB:.0f} MB, peak {sampler.peak / MB:.0f} MB while a "
          f"{len(frame) / MB:.0f} MB message was taken")
    assert grew < 30 * MB, f"RSS grew {grew / MB:.0f} MB for a {len(frame) / MB:.0f} MB message"


STALLED = 24   # websockets, each stalled inside a message of just under 4 MiB


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
async def test_websocket_messages_stalled_under_4_mib_neither_swell_nor_hold_the_agent(
        tmp_path: Path, agent_process: Any, fragmented: bool) -> None:
    """A websocket message of up to 4 MiB was read by aiohttp, whole, before any of it was
    charged to the in-flight budget, and with no deadline: each connection that sent most
    of one and stalled held its bytes for as long as it stayed open. 24 of them took the
    agent ~100 MB over idle (1,024, the connection cap: 4 GiB) with 0 bytes in flight.
    Charged from its first byte as an HTTP body is, the ones past the budget are refused
    1013 at once, the ones it holds closed 1008 at listen.body_timeout_s, and RSS stays
    put; then the budget is free again."""
    agent = offline_agent(tmp_path, agent_process, body_timeout_s=2)
    assert agent.proc is not None
    sampler = RssSampler(agent.proc.pid)
    size = 4 * MB - 1024
    first = 0x01 if fragmented else 0x81   # a text frame; final unless a first fragment
    head = bytes([first, 0x80 | 127]) + struct.pack("!Q", size) + b"\0\0\0\0"
    body = b'{"data":[' + b" " * (size - 10)   # all but its last byte
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{agent.url}/app/{KEY}/track", json={"data": [{"id": 1}]}) as r:
            assert r.status == 200
        idle = sampler.rss()
        opened = [await raw_websocket(agent.port, f"/app/{KEY}/track") for _ in range(STALLED)]
        try:
            with sampler.running():
                for _reader, writer in opened:
                    writer.write(head + body)
                closes = await asyncio.gather(*(read_close(reader, timeout=8)
                                                for reader, _ in opened),
                                              return_exceptions=True)
        finally:
            for _reader, writer in opened:
                writer.close()
        grown = sampler.peak - idle
        assert grown <= 40 * MB, f"RSS grew {grown / MB:.0f} MB with {STALLED} stalled messages"
        codes = sorted(c[0] if isinstance(c, tuple) else repr(c) for c in closes)
        assert set(codes) <= {WSCloseCode.POLICY_VIOLATION, WSCloseCode.TRY_AGAIN_LATER}, codes
        assert WSCloseCode.POLICY_VIOLATION in codes, codes   # the one held: body_timeout_s

        async def budget_free() -> bool:
            return await metric(s, agent.url, "ingest_inflight_bytes") == 0
        await wait_for(budget_free)
