"""The express lane (agent/server/express.py): plain single-event requests answered
without aiohttp's request machinery, with the reply aiohttp's route would give.

Every test sends raw HTTP over a real socket to an in-process agent, so that what is
sent (pipelining, split heads, odd fields) is exactly what the test says. Which lane
answered is read from the agent's own counter (`connections.express` in /status).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import random
import re
import socket
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from agent.dialects.replies import STORED, json_reply
from agent.families import segment as spec
from agent.metrics import Metrics
from agent.server import express
from agent.server.admission import Admission
from agent.server.app import EXPRESS
from agent.server.connections import BUF_MAX, ConnectionLimits, _Conn
from agent.server.express import ExpressLane, HeadScan, Routes
from agent.server.guard import Guard
from agent.settings import ListenConfig
from tests.conftest import write_config
from tests.segment_helpers import fill_spool
from tests.waiting import wait_for

KEY = "expressKey1"
AUTH = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")


def track(**extra: Any) -> bytes:
    return orjson.dumps({"type": "track", "event": "e", "userId": "u",
                         "messageId": uuid.uuid4().hex, **extra})


def post(path: str, body: bytes, *, auth: str | None = AUTH,
         fields: tuple[tuple[str, str], ...] = ()) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if auth is not None:
        head.append(f"Authorization: {auth}")
    head += [f"{name}: {value}" for name, value in fields]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


class Client:
    """One raw keep-alive connection; reads whole replies by their Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> bytes:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
        return head + await asyncio.wait_for(self.reader.readexactly(length), 10)

    async def until_closed(self) -> bytes:
        """What the agent sends until it closes the connection: a reset is its close too
        (Linux resets one closed with bytes of ours unread)."""
        try:
            return await self.reader.read()
        except ConnectionResetError:
            return b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionResetError):   # the agent's close, reset
            await self.writer.wait_closed()


def undated(reply: bytes) -> bytes:
    return DATE.sub(b"\r\nDate: -\r\n", reply)


def express_count(agent: Any) -> int:
    return int(agent.metrics.express_requests)


def batch(*messages: bytes) -> bytes:
    return b'{"batch": [' + b",".join(messages) + b"]}"


CASES = {  # name -> (path, a fresh body at each call)
    "stored": ("/v1/track", lambda: track()),
    "not json": ("/v1/track", lambda: b"{not json"),
    "not an object": ("/v1/track", lambda: b"[1, 2]"),
    "empty": ("/v1/track", lambda: b""),
    "invalid message": ("/v1/track", lambda: orjson.dumps({"type": "track", "userId": "u"})),
    "too large": ("/v1/track", lambda: track(pad="x" * (spec.MAX_EVENT_BYTES + 10))),
    "batch stored": ("/v1/batch", lambda: batch(track(), track())),
    "batch in part": ("/v1/batch", lambda: batch(track(), b'{"type": "track"}')),
    "batch not json": ("/v1/batch", lambda: b'{"batch": ['),
    "batch not a batch": ("/v1/batch", lambda: b'{"batch": 3}'),
    "batch empty": ("/v1/import", lambda: b'{"batch": []}'),
    "import stored": ("/v1/import", lambda: batch(track())),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_express_reply_is_the_reply_aiohttp_gives(
        make_agent: Callable[..., Any], case: str) -> None:
    """The same request, once in the lane and once on aiohttp's route (a query string
    sends it there), gets the same status, fields and body; only the lane's count moves
    for the first."""
    agent = await make_agent(listen={"accept_keys": [KEY]})
    path, body = CASES[case]
    client = await Client.open(agent.port)
    await client.send(post(path, body()))
    fast = await client.reply()
    assert express_count(agent) == 1
    other = await Client.open(agent.port)
    await other.send(post(path + "?via=aiohttp", body()))
    slow = await other.reply()
    assert express_count(agent) == 1
    assert undated(fast) == undated(slow)
    await client.close()
    await other.close()


async def test_a_full_spools_refusal_is_the_reply_aiohttp_gives(
        make_agent: Callable[..., Any]) -> None:
    """A single call refused for want of room: the lane's 503 is aiohttp's route's, byte
    for byte (Retry-After and the error body included)."""
    agent = await make_agent(storage={"max_size_mb": 1, "full_retry_after_s": 7})
    await fill_spool(agent.port)
    client = await Client.open(agent.port)
    await client.send(post("/v1/track", track()))
    fast = await client.reply()
    await client.send(post("/v1/track?via=aiohttp", track()))
    slow = await client.reply()
    assert fast.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 7\r\n" in fast, fast
    assert undated(fast) == undated(slow)
    await client.close()


async def test_an_event_too_large_for_its_upstream_is_the_reply_aiohttp_gives(
        make_agent: Callable[..., Any]) -> None:
    """A single call whose event no upstream of its key could carry: the lane's refusal
    is aiohttp's route's, byte for byte, and nothing is stored."""
    agent = await make_agent(upstreams=[{
        "name": "small", "protocol": "segment-http", "url": "http://127.0.0.1:9",
        "keys": [KEY], "batch_max_bytes": 4096}])
    client = await Client.open(agent.port)
    await client.send(post("/v1/track", track(pad="x" * 8000)))
    fast = await client.reply()
    await client.send(post("/v1/track?via=aiohttp", track(pad="x" * 8000)))
    slow = await client.reply()
    assert fast.startswith(b"HTTP/1.1 413 ") and b"too large for upstream" in fast, fast
    assert undated(fast) == undated(slow)
    assert express_count(agent) == 1 and agent.spool.depth == 0
    await client.close()


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
async def test_a_wrong_key_is_refused_and_counted_the_same_way(
        make_agent: Callable[..., Any], path: str) -> None:
    agent = await make_agent(listen={"accept_keys": [KEY]})
    wrong = "Basic " + base64.b64encode(b"notTheKey:").decode()
    body = track() if path == "/v1/track" else batch(track())
    client = await Client.open(agent.port)
    await client.send(post(path, body, auth=wrong))
    fast = await client.reply()
    await client.send(post(path + "?via=aiohttp", body, auth=wrong))
    slow = await client.reply()
    assert fast.startswith(b"HTTP/1.1 401 ") and undated(fast) == undated(slow)
    assert agent.metrics.refused[("segment", 401)] == 2
    assert express_count(agent) == 1
    assert agent.spool.depth == 0


async def test_keep_alive_requests_all_go_through_the_lane(
        make_agent: Callable[..., Any]) -> None:
    agent = await make_agent()
    client = await Client.open(agent.port)
    for i in range(50):
        await client.send(post("/v1/t" if i % 2 else "/v1/track", track()))
        assert (await client.reply()).startswith(b"HTTP/1.1 200 ")
    assert express_count(agent) == 50
    assert agent.spool.depth == 50
    await client.close()


def lane_tasks() -> int:
    """The tasks answering connections' requests in the lane (one a connection)."""
    return sum(task.get_name() == "express" for task in asyncio.all_tasks())


async def test_a_connections_task_ends_when_it_closes_goes_to_aiohttp_or_the_agent_stops(
        make_agent: Callable[..., Any]) -> None:
    """Each connection's requests are answered by one task that waits between them: it
    ends when the client leaves, when the connection goes to aiohttp, and, idle, at a stop
    (which does not wait for it)."""
    agent = await make_agent()
    leaving, handed, idle = [await Client.open(agent.port) for _ in range(3)]
    for client in (leaving, handed, idle):
        for _ in range(3):
            await client.send(post("/v1/track", track()))
            assert (await client.reply()).startswith(b"HTTP/1.1 200 ")
    assert lane_tasks() == 3
    await leaving.close()
    await wait_for(lambda: lane_tasks() == 2)
    await handed.send(GET_HEALTHZ)
    assert (await handed.reply()).startswith(b"HTTP/1.1 200 ")
    await wait_for(lambda: lane_tasks() == 1)
    await handed.send(post("/v1/track", track()))   # aiohttp's now: no task comes back
    assert (await handed.reply()).startswith(b"HTTP/1.1 200 ")
    assert lane_tasks() == 1 and express_count(agent) == 9 and agent.spool.depth == 10
    await asyncio.wait_for(agent.stop(), 60)
    assert lane_tasks() == 0


async def test_an_idle_connections_task_ends_when_it_times_out_or_is_reset(
        make_agent: Callable[..., Any]) -> None:
    """A connection idle after its replies, closed by the agent's idle_timeout_s, or reset
    by its client: its lane task ends with it (none waits for a request that cannot come)."""
    agent = await make_agent(listen={"idle_timeout_s": 0.2})
    clients = [await Client.open(agent.port) for _ in range(2)]
    for client in clients:
        for _ in range(2):
            await client.send(post("/v1/track", track()))
            assert (await client.reply()).startswith(b"HTTP/1.1 200 ")
    assert lane_tasks() == 2
    sock = clients[1].writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    clients[1].writer.transport.abort()   # a reset (RST)
    # At most one left: a slow run may time the reset one out first, as idle.
    await wait_for(lambda: lane_tasks() <= 1)
    assert await clients[0].until_closed() == b""   # the agent's idle close
    await wait_for(lambda: lane_tasks() == 0)
    assert agent.metrics.connections_closed.get("idle") in (1, 2)
    assert not agent.app[EXPRESS]._waiting


async def test_an_idle_connection_holds_no_body_of_its_requests(
        make_agent: Callable[..., Any]) -> None:
    """A keep-alive connection waiting for its next request holds nothing of the ones it
    sent (their bodies: up to BODY_MAX each), after its first request or any later one:
    idle connections up to listen.max_connections cost no body each."""
    agent = await make_agent()
    clients = [await Client.open(agent.port) for _ in range(8)]
    pad = "x" * 20_000
    tracemalloc.start()
    try:
        # The first request, later ones, then two pipelined: each held differently.
        for turn in range(4):
            for client in clients:
                sent = 2 if turn == 3 else 1
                await client.send(b"".join(post("/v1/track", track(pad=pad))
                                           for _ in range(sent)))
                for _ in range(sent):
                    assert (await client.reply()).startswith(b"HTTP/1.1 200 ")
            gc.collect()
            held = [stat for stat in tracemalloc.take_snapshot().statistics("lineno")
                    if stat.traceback[0].filename == express.__file__
                    and stat.size >= len(pad)]
            assert not held, (turn, held)
    finally:
        tracemalloc.stop()
    assert lane_tasks() == len(clients)
    for client in clients:
        await client.close()


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over(
        make_agent: Callable[..., Any]) -> None:
    """Two express requests, then one for aiohttp, then another express-shaped one, all
    in one write: four replies in order; from the third on the connection is aiohttp's."""
    agent = await make_agent()
    client = await Client.open(agent.port)
    ids = [uuid.uuid4().hex for _ in range(3)]
    await client.send(post("/v1/track", track(messageId=ids[0]))
                      + post("/v1/track", b"{broken")
                      + GET_HEALTHZ
                      + post("/v1/track", track(messageId=ids[1])))
    replies = [await client.reply() for _ in range(4)]
    assert [r.split(b" ", 2)[1] for r in replies] == [b"200", b"400", b"200", b"200"]
    assert b"Success" in replies[3]
    assert express_count(agent) == 2
    assert agent.spool.depth == 2
    await client.close()


def chunked(path: str, body: bytes, trailer: bytes = b"") -> bytes:
    """``body`` POSTed in two chunks, with an optional trailer section."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: {AUTH}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    half = len(body) // 2
    return head + b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                           for part in (body[:half], body[half:])) + b"0\r\n" + trailer + b"\r\n"


@pytest.mark.parametrize("piece", [0, 7])   # one write; written 7 bytes at a time
async def test_requests_pipelined_after_a_chunked_body_are_each_read_and_answered(
        make_agent: Callable[..., Any], piece: int) -> None:
    """A chunked body hands the connection to aiohttp: what follows it in the same write
    (a Content-Length request, another chunked one after a trailer, a batch) is neither
    dropped nor read as part of it. Each gets its reply, in order, and each event is
    stored once, as sent."""
    agent = await make_agent()
    client = await Client.open(agent.port)
    ids = [uuid.uuid4().hex for _ in range(5)]
    data = (post("/v1/track", track(messageId=ids[0]))
            + chunked("/v1/track", track(messageId=ids[1]))
            + post("/v1/track", track(messageId=ids[2]))
            + chunked("/v1/t", track(messageId=ids[3]), trailer=b"X-Trailer: 1\r\n")
            + post("/v1/batch", b'{"batch": [' + track(messageId=ids[4]) + b"]}"))
    if piece:
        for i in range(0, len(data), piece):
            await client.send(data[i:i + piece])
    else:
        await client.send(data)
    replies = [await client.reply() for _ in range(5)]
    assert [r.split(b" ", 2)[1] for r in replies] == [b"200"] * 5, replies
    assert agent.spool.depth == 5
    rows = await agent.spool.fetch(agent.spool.streams[KEY].id, 0, 10)
    assert sorted(orjson.loads(bytes(r.body))["messageId"] for r in rows) == sorted(ids)
    await client.close()


@pytest.mark.parametrize("fields", [
    (("Transfer-Encoding", "chunked"),),
    (("Content-Length", "5"),),                 # a second Content-Length
    (("Content-Encoding", "identity"),),
    (("Expect", "100-continue"),),
    (("Connection", "close"),),
    (("Origin", "http://127.0.0.1"),),
    (("Sec-Fetch-Site", "same-origin"),),
    (("X-Odd", "a\x01b"),),                     # a control character in a value
])
async def test_requests_the_lane_does_not_take_get_aiohttps_answer(
        make_agent: Callable[..., Any], fields: tuple[tuple[str, str], ...]) -> None:
    """Each of these is answered by aiohttp (its reply, whatever it is: a 400, a CORS
    refusal, a 200 after a 100-continue), never by the lane."""
    agent = await make_agent()
    s = socket.create_connection(("127.0.0.1", agent.port))
    s.sendall(post("/v1/track", track(), fields=fields))
    s.settimeout(10)
    reply = await asyncio.get_running_loop().run_in_executor(None, s.recv, 65536)
    assert reply.startswith(b"HTTP/1."), reply  # aiohttp answers a head it refuses in 1.0
    assert express_count(agent) == 0
    s.close()


async def test_a_field_name_with_a_space_before_its_colon_is_aiohttps_400(
        make_agent: Callable[..., Any]) -> None:
    agent = await make_agent()
    client = await Client.open(agent.port)
    body = track()
    await client.send(b"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length : "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert (await asyncio.wait_for(client.reader.read(65536), 10)).startswith(b"HTTP/1.0 400 ")
    assert express_count(agent) == 0 and agent.spool.depth == 0
    await client.close()


async def test_an_http_1_1_request_without_host_is_aiohttps_400(
        make_agent: Callable[..., Any]) -> None:
    """HTTP/1.1 requires a Host, and aiohttp answers 400 to a request without one; the lane
    stored it and answered 200, so the same request with a query (aiohttp's) was refused.
    HTTP/1.0 without Host, a local tool's, is served (docs/security.md)."""
    agent = await make_agent()
    hostless = post("/v1/track", track()).replace(b"Host: 127.0.0.1\r\n", b"")
    client = await Client.open(agent.port)
    await client.send(hostless)
    assert (await asyncio.wait_for(client.reader.read(65536), 10)).startswith(b"HTTP/1.0 400 ")
    assert express_count(agent) == 0 and agent.spool.depth == 0
    await client.close()
    client = await Client.open(agent.port)
    await client.send(hostless.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1))
    assert (await client.reply()).startswith(b"HTTP/1.0 200 ")
    assert agent.spool.depth == 1
    await client.close()


async def test_a_foreign_host_gets_the_guards_refusal(make_agent: Callable[..., Any]) -> None:
    agent = await make_agent()
    client = await Client.open(agent.port)
    await client.send(post("/v1/track", track()).replace(
        b"Host: 127.0.0.1", b"Host: evil.example"))
    reply = await client.reply()
    assert reply.startswith(b"HTTP/1.1 421 "), reply
    assert express_count(agent) == 0 and agent.spool.depth == 0
    await client.close()


async def test_a_half_closed_connection_still_gets_its_reply(
        make_agent: Callable[..., Any]) -> None:
    agent = await make_agent()
    client = await Client.open(agent.port)
    await client.send(post("/v1/track", track()))
    client.writer.write_eof()
    reply = await client.reply()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert await asyncio.wait_for(client.reader.read(), 10) == b""  # then closed
    assert agent.spool.depth == 1
    await client.close()


async def test_requests_pipelined_before_a_half_close_each_get_their_reply(
        make_agent: Callable[..., Any]) -> None:
    """Every request stored is answered: none is taken after the peer's EOF only to have
    its reply cut off by the close."""
    agent = await make_agent()
    client = await Client.open(agent.port)
    await client.send(post("/v1/track", track()) + post("/v1/track", track()))
    client.writer.write_eof()
    replies = [await client.reply() for _ in range(2)]
    assert all(r.startswith(b"HTTP/1.1 200 ") for r in replies)
    assert await asyncio.wait_for(client.reader.read(), 10) == b""
    assert agent.spool.depth == 2
    await client.close()


async def test_a_request_for_aiohttp_pipelined_before_a_half_close_gets_its_reply(
        make_agent: Callable[..., Any]) -> None:
    """The EOF comes while the lane's reply is pending (its commit held: the test holds the
    writer's lock); the request after it is aiohttp's, which answers a half-closed client
    (server/connections.py) as the lane does: answered too, then the connection closed."""
    agent = await make_agent()
    client = await Client.open(agent.port)
    body = track()
    async with agent.spool.writer.lock:
        await client.send(post("/v1/track", body) + GET_HEALTHZ)
        await wait_for(lambda: agent.metrics.inflight_bytes == len(body))
        client.writer.write_eof()
        port = client.writer.get_extra_info("sockname")[1]
        conn = next(c for c in gc.get_objects() if isinstance(c, _Conn) and c.transport
                    and c.transport.get_extra_info("peername")[1] == port)
        await wait_for(lambda: conn.eof)
    replies = [await client.reply() for _ in range(2)]
    assert [r.split(b" ", 2)[1] for r in replies] == [b"200", b"200"], replies
    assert await asyncio.wait_for(client.reader.read(), 10) == b""
    assert agent.spool.depth == 1
    await client.close()


async def test_an_express_head_sent_a_byte_at_a_time_is_closed_at_the_header_timeout(
        make_agent: Callable[..., Any]) -> None:
    agent = await make_agent(listen={"header_timeout_s": 0.3, "idle_timeout_s": 60})
    client = await Client.open(agent.port)
    head = post("/v1/track", track())[:-40]
    closed = asyncio.ensure_future(client.until_closed())
    # A byte every 0.03 s of the loop's clock (the agent's too): the 0.3 s deadline falls
    # before the head is all sent, which a per-byte idle timer would never reach.
    sent = 0
    while sent < len(head) and not closed.done():
        client.writer.write(head[sent:sent + 1])
        sent += 1
        await asyncio.wait({closed}, timeout=0.03)
    assert sent < len(head), "the drip never had the head closed"
    assert await asyncio.wait_for(closed, 10) == b""
    assert agent.metrics.connections_closed.get("slow_head") == 1
    await client.close()


async def test_requests_being_answered_when_a_stop_begins_still_get_their_replies(
        make_agent: Callable[..., Any]) -> None:
    """Commits are held (the test holds the writer's lock) while 20 requests wait in the
    lane; a stop begins, and only once the lane is closing are commits let go: every
    request still gets its 200 before the connections close."""
    agent = await make_agent()
    clients = [await Client.open(agent.port) for _ in range(20)]
    bodies = [track() for _ in clients]
    async with agent.spool.writer.lock:
        for c, body in zip(clients, bodies):
            c.writer.write(post("/v1/track", body))
        await wait_for(lambda: agent.metrics.inflight_bytes == sum(map(len, bodies)))
        stopping = asyncio.ensure_future(agent.stop())
        await wait_for(lambda: agent.app[EXPRESS].closing)
    for c in clients:
        reply = await asyncio.wait_for(c.reader.read(), 10)
        assert reply.startswith(b"HTTP/1.1 200 "), reply
    await stopping
    assert express_count(agent) == 20


async def test_however_the_bytes_are_split_the_replies_are_the_same(
        make_agent: Callable[..., Any]) -> None:
    """Requests written in pieces cut at random places (heads and bodies cut anywhere,
    one cut pattern per round, seeded) get the replies they get written whole, in
    order; every event is stored once."""
    agent = await make_agent()
    rng = random.Random(11)
    for round_ in range(60):
        ids = [uuid.uuid4().hex for _ in range(3)]
        stream = (post("/v1/track", track(messageId=ids[0])) + post("/v1/track", b"[]")
                  + post("/v1/identify", orjson.dumps({"userId": "u", "messageId": ids[1]}))
                  + GET_HEALTHZ + post("/v1/track", track(messageId=ids[2])))
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, 12)))
        client = await Client.open(agent.port)
        for a, b in zip([0, *cuts], [*cuts, len(stream)]):
            await client.send(stream[a:b])
        statuses = [(await client.reply()).split(b" ", 2)[1] for _ in range(5)]
        assert statuses == [b"200", b"400", b"200", b"200", b"200"], (round_, cuts)
        assert agent.spool.depth == 3 * (round_ + 1), (round_, cuts)
        await client.close()
    assert express_count(agent) > 0  # the whole writes at least went through the lane


class _Transport(asyncio.Transport):
    """The socket side of one connection, as the loop drives it: takes writes, and
    says whether reading is paused (a client can send only while it is not)."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += 1

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False


class _Aiohttp(asyncio.Protocol):
    """Stands in for aiohttp's protocol, which a lane-only client never reaches."""

    def data_received(self, data: bytes) -> None:
        raise AssertionError("handed over")


def _lane_connection(route: Callable[[bytes, list[str]], Awaitable[web.Response]]
                     ) -> tuple[_Conn, _Transport]:
    """A connection of the express lane with ``route`` at /v1/track, on a test transport."""
    metrics = Metrics()
    lane = ExpressLane([Routes({"/v1/track": route}, lambda status: None)],
                       Guard("127.0.0.1", ()), Admission(1 << 30, metrics), metrics)
    conn = _Conn(ConnectionLimits(ListenConfig(), 64, metrics), _Aiohttp(), lane)
    transport = _Transport()
    conn.connection_made(transport)
    return conn, transport


def test_a_heads_fields_read_from_lines_seen_before_give_the_same_verdicts() -> None:
    """The lane keeps each field line's reading, and each head's verdict: a head whose
    lines it has seen, or the head itself, is taken or left to aiohttp as the first time,
    a line repeated within a head (the same line twice) too, and the lines and heads kept
    stay bounded (a long line, or a long head, is read, not kept)."""
    async def route(body: bytes, keys: list[str]) -> Any:
        raise AssertionError("not run")

    metrics = Metrics()
    lane = ExpressLane([Routes({"/v1/track": route}, lambda status: None)],
                       Guard("127.0.0.1", ()), Admission(1 << 30, metrics), metrics)
    body = track()
    heads = {
        "taken": post("/v1/track", body),
        "twice": post("/v1/track", body, fields=(("Host", "127.0.0.1"),)),
        "origin": post("/v1/track", body, fields=(("Origin", "http://127.0.0.1"),)),
        "close": post("/v1/track", body, fields=(("Connection", "close"),)),
    }
    for _ in range(2):
        verdicts = {name: lane.match(bytearray(head), 0, HeadScan())
                    for name, head in heads.items()}
        assert verdicts["taken"] is not None and verdicts["taken"][1] == len(heads["taken"])
        assert verdicts["taken"][0][2:] == (body, [KEY])
        assert verdicts["twice"] is verdicts["origin"] is verdicts["close"] is None
    for n in range(2 * express.LINES_KEPT):
        assert lane.match(bytearray(post("/v1/track", body, fields=(("X-N", str(n)),))), 0,
                          HeadScan())
    assert len(lane._lines) <= express.LINES_KEPT
    assert len(lane._verdicts) <= express.VERDICTS_KEPT
    long = ("X-Pad", "x" * express.HEAD_KEPT_MAX)
    assert lane.match(bytearray(post("/v1/track", body, fields=(long,))), 0, HeadScan())
    assert b"X-Pad: x" not in b"".join(lane._lines)
    assert b"X-Pad: x" not in b"".join(lane._verdicts)


def test_a_stored_calls_reply_carries_each_seconds_date(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stored call's reply is built once a second, not at every request: the reply in
    a later second has that second's Date, and is the reply a new lane builds then."""
    def lane() -> ExpressLane:
        metrics = Metrics()
        return ExpressLane([], Guard("127.0.0.1", ()), Admission(1 << 30, metrics), metrics)

    now = [1_800_000_000.25]
    monkeypatch.setattr(time, "time", lambda: now[0])
    answering = lane()
    first = answering.render(STORED)
    assert answering.render(STORED) == first
    now[0] += 1
    later = answering.render(STORED)
    assert f"\r\nDate: {formatdate(1_800_000_001, usegmt=True)}\r\n".encode() in later
    assert later != first and undated(later) == undated(first)
    assert later == lane().render(STORED)


async def test_a_pipelining_client_cannot_grow_the_lanes_buffer_past_its_bound() -> None:
    """A client that writes requests back to back as fast as reading lets it, 256 KB a
    read (uvloop's read size), while it reads the replies: the lane holds at most BUF_MAX
    bytes waiting, one read, and BUF_MAX answered ones not yet dropped, and every request
    is answered."""
    async def ok(raw: bytes, given: list[str]) -> web.Response:
        return json_reply({"Success": True}, 200)

    conn, transport = _lane_connection(ok)
    one = post("/v1/track", track())
    stream = one * 6000
    read, sent, most = 256 * 1024, 0, 0
    async with asyncio.timeout(60):
        while transport.written < 6000:
            if transport.reading and sent < len(stream):
                conn.data_received(stream[sent:sent + read])
                sent += read
            most = max(most, len(conn.buf))
            await asyncio.sleep(0)
    assert most <= 2 * BUF_MAX + read, most


async def test_a_head_with_bare_lf_line_ends_is_answered_not_left_waiting(
        make_agent: Callable[..., Any]) -> None:
    """The lane waited for CRLF CRLF, which such a head never has: the request was left
    unanswered until the header timeout closed the connection (audit). aiohttp answers it."""
    agent = await make_agent(listen={"header_timeout_s": 60})
    body = track()
    client = await Client.open(agent.port)
    await client.send(b"POST /v1/track HTTP/1.1\nHost: 127.0.0.1\nContent-Length: "
                      + str(len(body)).encode() + b"\nContent-Type: application/json\n\n" + body)
    line = await asyncio.wait_for(client.reader.readline(), 10)
    assert re.match(rb"HTTP/1\.[01] 400 ", line), line   # aiohttp's parser refuses it
    await client.close()


@pytest.mark.parametrize("head", [
    b"Content-Length: %d\r\n",        # no blank line: the body follows the fields
    b"Content-Length: %d\r\r\n",      # a bare CR ends the last field
    b"Content-Length: %d\n\r\n",      # a bare LF, then the blank line
    b"Content-Length: %d\rX: 1\r\n\r\n",  # a bare CR inside, CRLF CRLF only in the body
    b"Content-Length: %d\r\n\x00\r\n\r\n",  # a NUL where a field name starts
])
async def test_a_malformed_head_is_answered_at_once_not_at_the_header_timeout(
        make_agent: Callable[..., Any], head: bytes) -> None:
    """A whole request whose head already breaks HTTP/1.1's grammar but never shows the
    lane CRLF CRLF where its head would end: aiohttp refuses such a head with a 400 as
    soon as it sees the fault. The lane held it as "more to come" until the header timeout
    closed the connection without a reply."""
    agent = await make_agent(listen={"header_timeout_s": 60})
    body = track()
    client = await Client.open(agent.port)
    await client.send(b"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      + head % len(body) + body)
    line = await asyncio.wait_for(client.reader.readline(), 10)
    assert re.match(rb"HTTP/1\.[01] 400 ", line), line
    assert agent.spool.depth == 0
    await client.close()


@pytest.mark.parametrize(("field", "value", "status"), [
    ("Host", b"\xa0localhost", b"421"),              # a lone byte 0xA0 (NBSP in Latin-1)
    ("Host", b"\x85127.0.0.1", b"421"),              # 0x85 (NEL in Latin-1)
    ("Host", b"localhost\xc2\xa0", b"421"),          # NBSP in UTF-8
    ("Authorization", AUTH.encode() + b"\xa0", b"401"),
    ("Authorization", b"\x85" + AUTH.encode(), b"401"),
    ("Authorization", AUTH.encode() + b"\xe3\x80\x80", b"401"),  # U+3000 in UTF-8
])
async def test_a_host_or_key_padded_with_non_ascii_space_is_refused_in_both_lanes(
        make_agent: Callable[..., Any], field: str, value: bytes, status: bytes) -> None:
    """Bytes 0x80-0xFF in a field are no whitespace in HTTP. The lane read field values
    as Latin-1 and the guard and auth stripped them with str.strip(), which takes NBSP
    (0xA0) and NEL (0x85) for space: the lane took `\\xa0localhost` for a loopback Host
    and a key padded so for the key, where aiohttp (reading UTF-8) refused them; in
    UTF-8, NBSP or U+3000 around a Host or key was taken by both."""
    agent = await make_agent(listen={"accept_keys": [KEY]})
    body = track()
    fields = {"Host": b"127.0.0.1", "Authorization": AUTH.encode(), field: value}
    head = b"".join(name.encode() + b": " + v + b"\r\n" for name, v in fields.items())
    for path in (b"/v1/track", b"/v1/track?via=aiohttp"):
        client = await Client.open(agent.port)
        await client.send(b"POST " + path + b" HTTP/1.1\r\n" + head
                          + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        reply = await client.reply()
        assert reply.split(b" ", 2)[1] == status, (path, reply)
        await client.close()
    assert agent.spool.depth == 0
    assert express_count(agent) == 0


@pytest.mark.parametrize(("extra", "taken"), [(124, True), (125, False)])
async def test_a_head_with_more_fields_than_aiohttp_takes_gets_aiohttps_400(
        make_agent: Callable[..., Any], extra: int, taken: bool) -> None:
    """aiohttp refuses a head of more than 128 fields (400 "Too many headers received").
    The lane took any number that fit its 8 KB, and stored the event: a request answered
    200 by the lane that aiohttp refuses. 124 fields besides post()'s 4 make 128, which
    both take."""
    agent = await make_agent()
    client = await Client.open(agent.port)
    fields = tuple((f"X-{i}", "v") for i in range(extra))
    await client.send(post("/v1/track", track(), fields=fields))
    reply = await client.reply()
    if taken:
        assert reply.startswith(b"HTTP/1.1 200 ") and express_count(agent) == 1, reply
        assert agent.spool.depth == 1
    else:
        assert reply.startswith(b"HTTP/1.0 400 "), reply
        assert reply.endswith(b"Too many headers received"), reply
        assert express_count(agent) == 0 and agent.spool.depth == 0
    await client.close()


async def test_clients_that_leave_at_once_leave_nothing_in_the_lanes_table(
        make_agent: Callable[..., Any]) -> None:
    """Clients that send a request and leave at once (closed, or reset), many at a time:
    a leaving client cancels nothing, so each request still runs, is stored, and takes
    itself out of the lane's table of requests being answered; none is left there."""
    agent = await make_agent()
    lane = agent.app[EXPRESS]
    n = 100
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", agent.port))
        if i % 2:   # a reset (RST) rather than a close (FIN)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        s.sendall(post("/v1/track", track()))
        s.close()
    await wait_for(lambda: agent.spool.depth == n)
    await wait_for(lambda: not lane._tasks)
    assert express_count(agent) == n


@pytest.mark.parametrize("piece", [1, 3])
async def test_a_head_sent_a_few_bytes_at_a_time_is_answered_by_the_lane(
        make_agent: Callable[..., Any], piece: int) -> None:
    """Each piece of a head is a packet of its own: its CRLF pairs (and the blank line's)
    split across packets, the lane still finds where the head ends, and answers. (The
    head's last byte comes with the body: the lane answers a request whose body is in
    hand when its head ends, and leaves the rest to aiohttp.)"""
    agent = await make_agent(listen={"header_timeout_s": 60})
    client = await Client.open(agent.port)
    body = track()
    stream = post("/v1/track", body, fields=(("X-Pad", "p" * 2000),))
    head = len(stream) - len(body) - 1
    for at in range(0, head, piece):
        await client.send(stream[at:min(at + piece, head)])
    await client.send(stream[head:])
    assert (await client.reply()).startswith(b"HTTP/1.1 200 ")
    assert express_count(agent) == 1 and agent.spool.depth == 1
    await client.close()


async def test_a_head_past_80_kib_sent_in_pieces_is_431(make_agent: Callable[..., Any]) -> None:
    """A head begun in the lane that grows past what the lane takes (express.HEAD_MAX) goes
    to aiohttp, and past 80 KiB is answered 431 and closed (docs/security.md), however it
    was cut."""
    agent = await make_agent(listen={"header_timeout_s": 60})
    client = await Client.open(agent.port)
    pad = tuple((f"X-Pad-{i}", "p" * 1000) for i in range(90))
    stream = post("/v1/track", track(), fields=pad)
    for at in range(0, len(stream), 97):
        client.writer.write(stream[at:at + 97])
        with contextlib.suppress(ConnectionError):
            await client.writer.drain()
    reply = await asyncio.wait_for(client.until_closed(), 10)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert agent.metrics.connections_closed.get("large_head") == 1
    assert express_count(agent) == 0 and agent.spool.depth == 0
    await client.close()


class _Scanned(bytearray):
    """A connection's buffer that counts the bytes its searches and slices cover: what the
    lane reads of a head to learn whether it is whole."""

    read = 0

    def find(self, sub: Any, start: Any = None, end: Any = None) -> int:
        lo = 0 if start is None else start
        hi = len(self) if end is None else min(end, len(self))
        self.read += max(0, hi - lo)
        return super().find(sub, start, end)

    def __getitem__(self, key: Any) -> Any:
        got = super().__getitem__(key)
        if isinstance(key, slice):
            self.read += len(got)
        return got


async def test_a_head_sent_a_byte_a_packet_is_read_once_not_once_a_packet() -> None:
    """A head of nearly 8 KB, a byte a packet: each packet rescanned the whole head from
    its start (quadratic: ~32 MB read, ~0.2 s of the loop's CPU for one connection). Each
    packet now reads on from where the last stopped: a few times the request's length."""
    answered: list[bytes] = []

    async def ok(raw: bytes, given: list[str]) -> web.Response:
        answered.append(raw)
        return json_reply({"Success": True}, 200)

    conn, transport = _lane_connection(ok)
    conn.buf = buf = _Scanned()
    body = track()
    stream = post("/v1/track", body, fields=tuple((f"X-{i}", "v" * 70) for i in range(100)))
    head = len(stream) - len(body) - 1   # its last byte comes with the body (above)
    assert 7000 < head < express.HEAD_MAX
    for at in range(head):
        conn.data_received(stream[at:at + 1])
    conn.data_received(stream[head:])
    await wait_for(lambda: transport.written == 1)
    assert answered == [body]
    assert buf.read <= 8 * len(stream), buf.read


def lane_tables_empty(lane: ExpressLane) -> bool:
    """Nothing left of any connection in the lane's tables: tasks, those waiting for a
    request, requests queued for a busy task, connections to forget once idle."""
    return not (lane._tasks or lane._waiting or lane._next or lane._forgotten)


async def test_a_connection_reset_with_requests_queued_behind_one_leaves_no_trace_in_the_lane(
        make_agent: Callable[..., Any]) -> None:
    """Clients pipeline three requests each; while the first of each is being answered
    (commits held), two are reset (RST), two shut their side (FIN), and two wait for
    their replies. Once commits go on, every table of the lane empties: a request queued
    behind one being answered is never left there by a client that leaves (the lane takes
    the next request only as the reply before it is written, and none is written to a
    connection reset). A reset client's queued requests are dropped; those of a client
    that only shut its side are answered, as are the waiting clients'."""
    agent = await make_agent()
    lane = agent.app[EXPRESS]
    clients = [await Client.open(agent.port) for _ in range(6)]
    firsts = [track() for _ in clients]
    async with agent.spool.writer.lock:
        for client, first in zip(clients, firsts):
            client.writer.write(post("/v1/track", first)
                                + post("/v1/track", track()) + post("/v1/track", track()))
        await wait_for(lambda: agent.metrics.inflight_bytes == sum(map(len, firsts)))
        for i, client in enumerate(clients[:4]):
            if i % 2:
                sock = client.writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                client.writer.transport.abort()
            else:
                client.writer.close()
        await wait_for(lambda: agent.metrics.connections_open == 4)
    for client in clients[4:]:
        for _ in range(3):
            assert (await client.reply()).startswith(b"HTTP/1.1 200 ")
        await client.close()
    await wait_for(lambda: lane_tables_empty(lane))
    await wait_for(lambda: agent.spool.depth == 2 * 1 + 4 * 3)
    assert express_count(agent) == 2 * 1 + 4 * 3


async def test_a_key_a_reload_revokes_is_refused_at_the_next_request_of_the_same_head(
        make_agent: Callable[..., Any]) -> None:
    """A head's verdict is kept by its bytes: a key a reload takes out of
    listen.accept_keys is still refused at once, on the connection kept alive (the very
    same head) and on a new one, each refusal counted; a key kept goes on."""
    kept = "keptKey1"
    agent = await make_agent(listen={"accept_keys": [KEY, kept]})
    client = await Client.open(agent.port)
    await client.send(post("/v1/track", track()))
    assert (await client.reply()).startswith(b"HTTP/1.1 200 ")
    write_config(Path(agent.config_path), agent.spool.path, listen={"accept_keys": [kept]})
    await agent.reload()
    # Pipelined, two routes: each refused, and counted.
    await client.send(post("/v1/track", track()) + post("/v1/batch", batch(track())))
    for _ in range(2):
        assert (await client.reply()).startswith(b"HTTP/1.1 401 ")
    other = await Client.open(agent.port)
    await other.send(post("/v1/track", track()))
    assert (await other.reply()).startswith(b"HTTP/1.1 401 ")
    keeps = "Basic " + base64.b64encode(f"{kept}:".encode()).decode()
    await other.send(post("/v1/track", track(), auth=keeps))
    assert (await other.reply()).startswith(b"HTTP/1.1 200 ")
    assert express_count(agent) == 5
    assert agent.metrics.refused[("segment", 401)] == 3
    assert agent.spool.depth == 2
    await client.close()
    await other.close()


async def test_a_connections_requests_each_give_back_what_they_held_however_they_end(
        make_agent: Callable[..., Any]) -> None:
    """One ticket serves all of a connection's requests in the lane: each refused (413,
    401, 400, busy) or stored gives back all it held, and so does another connection's
    body reset midway; nothing stays in flight (/metrics), and a request after them all
    is stored."""
    agent = await make_agent(listen={"accept_keys": [KEY], "max_inflight_mb": 1})
    wrong = "Basic " + base64.b64encode(b"notTheKey:").decode()
    client = await Client.open(agent.port)
    await client.send(post("/v1/track", track()) + post("/v1/track", track(pad="x" * 40_000))
                      + post("/v1/track", track(), auth=wrong) + post("/v1/batch", b"{not")
                      + post("/v1/batch", batch(track(), track())))
    statuses = [(await client.reply())[9:12] for _ in range(5)]
    assert statuses == [b"200", b"413", b"401", b"400", b"200"]
    # A body all of the budget, coming slowly (aiohttp's: a query), then one the lane's.
    slow = await Client.open(agent.port)
    head = post("/v1/batch?via=aiohttp", b"x" * 1024 * 1024)[:-1024 * 1024]
    await slow.send(head + b'{"batch": [')
    await wait_for(lambda: agent.metrics.inflight_bytes == 1024 * 1024)
    await client.send(post("/v1/track", track()))
    busy = await client.reply()
    assert busy[9:12] in (b"429", b"503"), busy
    slow.writer.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    slow.writer.transport.abort()   # a reset (RST) midway through its body
    await wait_for(lambda: agent.metrics.inflight_bytes == 0)
    await client.send(post("/v1/track", track()))
    assert (await client.reply()).startswith(b"HTTP/1.1 200 ")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/metrics") as r:
            text = await r.text()
    assert re.search(r"^outpost_ingest_inflight_bytes 0$", text, re.MULTILINE), text
    assert express_count(agent) == 7
    assert agent.spool.depth == 4
    await client.close()
