"""The Nucleus websocket's own large-message reader (nucleus_frames.py), at its edges.

A message of exactly MAX_MESSAGE bytes was refused (1009, a reset): aiohttp refuses a frame
of max_msg_size bytes or more while the reader took only larger ones. A large message of
tiny values held the event loop ~0.3 s a socket read (each value is read in Python) for
~0.7 s a MiB. A large message whose sender stalled held its share of the in-flight budget
as long as it stayed connected.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random
import struct
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSCloseCode

from agent.dialects.nucleus import MAX_MESSAGE
from tests.test_nucleus_backlog import KEY, frame_head, raw_websocket, read_close
from tests.waiting import LoopTurns, wait_for

MB = 1024 * 1024
MAX_VALUES = 1_000_000   # the most values a large message may hold (docs/operations.md)


def message_of(size: int, first_id: int = 1) -> bytes:
    """A `{"data": [...]}` message of exactly ``size`` bytes (events of ids first_id..)."""
    events: list[dict[str, Any]] = []
    n, length = first_id, len(b'{"data":[]}') - 1   # a comma before each event but the first
    while True:
        ev = {"type": "event", "name": "e", "id": n, "payload": "x" * 200}
        length += len(orjson.dumps(ev)) + 1
        if length > size - 300:
            break
        events.append(ev)
        n += 1
    body = orjson.dumps({"data": events})
    pad = size - len(body)
    body = body[:-1] + b',"pad":"' + b"p" * (pad - 9) + b'"}'
    assert len(body) == size, (len(body), size)
    return body


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True,
          mask: bytes | None = None) -> bytes:
    """A client frame (masked) of ``payload``."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    if n < 126:
        head = bytes([(0x80 if fin else 0) | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([(0x80 if fin else 0) | opcode, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([(0x80 if fin else 0) | opcode, 0x80 | 127]) + struct.pack("!Q", n)
    m = int.from_bytes(mask * ((n + 3) // 4), "big") >> (8 * (-n % 4))
    return head + mask + (int.from_bytes(payload, "big") ^ m).to_bytes(n, "big")


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await asyncio.wait_for(reader.readexactly(2), 30)
    n = second & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first & 0x0F, await reader.readexactly(n)


@pytest.mark.parametrize("size", [MAX_MESSAGE - 1, MAX_MESSAGE, MAX_MESSAGE + 1])
async def test_a_message_at_the_large_boundary_is_acknowledged(make_agent: Any,
                                                               size: int) -> None:
    """Up to MAX_MESSAGE bytes aiohttp reads a message whole; over it, the Nucleus reader
    does: at the boundary, on either side of it, the message is acknowledged."""
    agent = await make_agent()
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    writer.write(frame(message_of(size)))
    await writer.drain()
    opcode, payload = await read_frame(reader)
    writer.close()
    assert opcode == 0x1, (opcode, payload[:2].hex())
    assert orjson.loads(payload)["reportedIds"][0] == 1


async def test_interleaved_control_frames_and_split_headers_keep_every_message(
        make_agent: Any) -> None:
    """Frames written a few bytes at a time (headers cut), nonzero masks: a small message,
    a ping, a fragmented message with a ping between its fragments, a large message, a
    small one; every message answered in order, the pings ponged."""
    agent = await make_agent()
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    small1 = b'{"data":[{"type":"event","name":"a","id":1}]}'
    frag = b'{"data":[{"type":"event","name":"b","id":2}]}'
    large = message_of(MAX_MESSAGE + 1000, first_id=100)
    small2 = b'{"data":[{"type":"event","name":"c","id":3}]}'
    stream = (frame(small1) + frame(b"hi", opcode=0x9)
              + frame(frag[:10], fin=False) + frame(b"mid", opcode=0x9)
              + frame(frag[10:20], opcode=0x0, fin=False) + frame(frag[20:], opcode=0x0)
              + frame(large) + frame(small2))
    rng = random.Random(5)
    pos = 0
    while pos < len(stream):
        n = rng.choice([1, 2, 3, 7, 13]) if pos < 400 or len(stream) - pos < 400 else 65536
        writer.write(stream[pos:pos + n])
        await writer.drain()
        pos += n
    got: list[tuple[int, Any]] = []
    while len(got) < 6:
        opcode, payload = await read_frame(reader)
        got.append((opcode, payload if opcode == 0xA else orjson.loads(payload)))
    writer.close()
    assert got[0] == (1, {"reportedIds": [1]})
    assert got[1] == (0xA, b"hi")
    assert got[2] == (0xA, b"mid")
    assert got[3] == (1, {"reportedIds": [2]})
    assert got[4][0] == 1 and got[4][1]["reportedIds"][0] == 100
    assert got[5] == (1, {"reportedIds": [3]})


async def test_a_stalled_large_message_is_closed_at_the_body_timeout(
        make_agent: Any, caplog: Any) -> None:
    """A module that sends a large message's header and stalls (stopped, a debugger) held
    4 MiB of the in-flight budget for as long as it stayed connected, so HTTP posts over
    2 MiB were refused busy meanwhile. Like an HTTP body, it has listen.body_timeout_s:
    then closed (1008), counted, logged, its share given back."""
    agent = await make_agent(listen={"body_timeout_s": 0.5})
    caplog.set_level(logging.INFO)
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    writer.write(frame_head(10 * MB) + b'{"data":[')
    await writer.drain()
    await wait_for(lambda: agent.metrics.inflight_bytes == 4 * MB)
    code, reason = await read_close(reader)
    writer.close()
    assert code == WSCloseCode.POLICY_VIOLATION, (code, reason)
    assert "body_timeout_s" in reason, reason
    await wait_for(lambda: agent.metrics.inflight_bytes == 0)
    assert agent.metrics.refused[("nucleus", WSCloseCode.POLICY_VIOLATION)] == 1
    assert any("body_timeout_s" in r.getMessage() for r in caplog.records)
    body = json.dumps({"data": [{"type": "event", "name": "x" * 100, "id": i}
                                for i in range(3 * MB // 140)]}).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{agent.port}/app/{KEY}/track", data=body) as r:
            assert r.status == 200, await r.text()


async def test_a_stalled_large_message_in_fragments_is_closed_at_the_body_timeout(
        make_agent: Any) -> None:
    """A message in fragments (as Chromium sends one) past 4 MiB whose sender then stalls
    is closed (1008) at listen.body_timeout_s, its share of the budget given back, as one
    in a single frame is."""
    agent = await make_agent(listen={"body_timeout_s": 0.5})
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    body = message_of(MAX_MESSAGE + MB)
    writer.write(chromium_frames(body)[:MAX_MESSAGE + MB // 2])   # cut short
    await writer.drain()
    code, reason = await read_close(reader)
    writer.close()
    assert code == WSCloseCode.POLICY_VIOLATION, (code, reason)
    assert "body_timeout_s" in reason, reason
    await wait_for(lambda: agent.metrics.inflight_bytes == 0)
    assert agent.spool.depth == 0


async def test_a_large_message_of_too_many_values_is_refused_1009_counted_and_logged(
        make_agent: Any, caplog: Any) -> None:
    """Each value of a large message costs ~1 µs of Python: past MAX_VALUES it is refused
    (1009) and the rest of it only skipped, so no message costs more than about a second."""
    agent = await make_agent()
    caplog.set_level(logging.INFO)
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    body = b'{"data":[' + b"0," * (MAX_VALUES + MAX_MESSAGE // 2) + b"0]}"
    writer.write(frame(body))
    code, reason = await read_close(reader, 60)   # ~1 s of CPU: slower on a busy machine
    writer.close()
    assert code == WSCloseCode.MESSAGE_TOO_BIG, (code, reason)
    assert f"{MAX_VALUES:,}" in reason, reason
    assert agent.metrics.refused[("nucleus", WSCloseCode.MESSAGE_TOO_BIG)] == 1
    assert agent.spool.depth == 0
    logged = [r.getMessage() for r in caplog.records if f"{MAX_VALUES:,}" in r.getMessage()]
    assert len(logged) == 1 and "k***" in logged[0], logged


REAL = orjson.dumps({"data": [{"type": "event", "name": f"e{i}", "id": i % 10_000 + 1,
                                "date": "2026-12-01T08:00:00.000Z", "machineId": "m" * 32,
                                "sessionId": 4242, "payload": {"i": i, "label": "x" * 300}}
                               for i in range(36_000)]})
TINY = b'{"data":[' + b"0," * (8 * MB) + b"0]}"


def chromium_frames(body: bytes, size: int = 131_000) -> bytes:
    """``body`` as Chromium writes a long message: a text frame, then continuations."""
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(frame(p, opcode=0x1 if n == 0 else 0x0, fin=n == len(pieces) - 1)
                    for n, p in enumerate(pieces))


@pytest.mark.parametrize("fragments", [False, True], ids=["one-frame", "fragments"])
@pytest.mark.parametrize("body", [REAL, TINY], ids=["real-16MiB", "zeros-16MiB"])
async def test_a_large_message_never_holds_the_event_loop_long(make_agent: Any,
                                                               body: bytes,
                                                               fragments: bool) -> None:
    """16 MiB of `0,` in one message: each value was read in Python (~0.7 s a MiB, vs
    ~8 ms for real events) a whole socket read at a time (up to 256 KiB), holding the
    event loop ~0.3 s each time. Now read a slice at a time, each a separate turn of the
    loop. Measured in this thread's CPU time a turn of the loop (LoopTurns; another
    process's load does not stretch it), with the collector off (its pauses are not the
    reader's); /healthz is answered while the message is read. In fragments (as Chromium
    sends it) the first 4 MiB are gathered before they are read: read a slice a turn too."""
    agent = await make_agent()
    sent = chromium_frames(body) if fragments else frame(body, mask=b"\0\0\0\0")
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    done = asyncio.Event()
    answered = 0

    async def health() -> None:
        nonlocal answered
        async with aiohttp.ClientSession() as s:
            while not done.is_set():
                async with s.get(f"http://127.0.0.1:{agent.port}/healthz") as r:
                    assert r.status == 200
                    await r.read()
                answered += 1

    gc.disable()
    try:
        async with LoopTurns(every=0) as turns:   # every turn: the gap is what one turn ran
            task = asyncio.ensure_future(health())
            writer.write(sent)
            opcode, payload = await read_frame(reader)
            done.set()
            await task
    finally:
        gc.enable()
    writer.close()
    assert turns.worst < 0.1, \
        f"the event loop was held {turns.worst * 1000:.0f} ms (CPU) at a time"
    if body is REAL:
        assert opcode == 0x1 and orjson.loads(payload)["reportedIds"], (opcode, payload[:100])
    else:   # over MAX_VALUES: refused
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1009, payload[:100]
    assert answered >= 2, answered


SMALLEST = frame(b'{"data":[]}', mask=b"\0\0\0\0")   # a message a module's heartbeat may be
SMALLEST_SENT = 30_000


async def test_a_flood_of_small_messages_never_holds_the_event_loop_long(
        make_agent: Any) -> None:
    """A client sending many small messages at once (17 bytes each: 15,000 in one socket
    read), each answered and storing nothing, so that answering one never waits: every
    message aiohttp had queued was answered in one turn of the loop, which /healthz
    waited out (50 such clients held it for over 20 s, and the agent grew past 290 MB).
    The CPU time of each turn measured as above, every answer read."""
    agent = await make_agent()
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    gc.disable()
    try:
        async with LoopTurns(every=0) as turns:
            writer.write(SMALLEST * SMALLEST_SENT)
            for _ in range(SMALLEST_SENT):
                opcode, payload = await read_frame(reader)
                assert opcode == 0x1 and orjson.loads(payload) == {"reportedIds": []}, payload
    finally:
        gc.enable()
    writer.close()
    assert turns.worst < 0.1, \
        f"the event loop was held {turns.worst * 1000:.0f} ms (CPU) at a time"


BROKEN_FRAMES = {   # a frame the websocket layer fails the connection on: (frame, code, said)
    "text not UTF-8": (frame(b'{"data":[{"name":"\xff","id":1}]}'), 1007, "UTF-8"),
    "reserved bits": (bytes([0xC1]) + frame(b"{}")[1:], 1002, "reserved bits"),
    "continuation of nothing": (frame(b"{}", opcode=0x0), 1002, "Continuation"),
    "unknown opcode": (frame(b"{}", opcode=0x3), 1002, "opcode"),
    "control frame over 125 bytes": (frame(b"x" * 126, opcode=0x9), 1002, "125 bytes"),
}


@pytest.mark.parametrize("data,code,said", BROKEN_FRAMES.values(), ids=BROKEN_FRAMES)
async def test_a_broken_frame_is_closed_with_a_reason_that_says_what_is_wrong(
        make_agent: Any, data: bytes, code: int, said: str) -> None:
    """The websocket layer failed the connection with its code alone: a module's log
    read `1007`, or `1002`, and nothing about what it had sent wrong."""
    agent = await make_agent()
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    try:
        writer.write(data)
        await writer.drain()
        got, reason = await read_close(reader)
    finally:
        writer.close()
    assert got == code, (got, reason)
    assert said in reason, reason
    assert agent.spool.depth == 0
