"""A websocket upstream that misbehaves after its handshake, or refuses the handshake.

The agent runs in process against real upstreams on 127.0.0.1: a deaf one
(tests/fakes/deaf_upstream.py) that takes the handshake and then reads nothing, and
the scripted tests/fakes/faulty_upstream.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
from aiohttp import web

from agent.forwarder.backoff import Backoff
from agent.forwarder.stream import OMITTED_LIMIT
from agent.forwarder.supervisor import Seams
from agent.logs import RedactingFilter
from agent.ops.status_table import render, size
from agent.settings import UpstreamConfig
from agent.uplinks.nucleus_ws import NucleusWsUplink
from tests.conftest import FAST_BACKOFF, write_config
from tests.fakes.deaf_upstream import DeafUpstream, RawUpstream, accept_websocket
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.loopback_server import LoopbackServer
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_upstream_faults import delivered, drained, event, manual, marks, send, upstream
from tests.waiting import wait_for

PAD = "x" * 8000   # an event of about 8 KB


async def status_of(agent: Any) -> dict[str, Any]:
    """The one upstream's entry in GET /status."""
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        assert r.status == 200
        (up,) = (await r.json())["upstreams"]
        return dict(up)


@pytest.fixture
async def deaf(fake_nucleus: FakeNucleus) -> AsyncIterator[DeafUpstream]:
    """Deaf until the test clears ``deaf``; then a relay to ``fake_nucleus``."""
    upstream = await DeafUpstream(fake_nucleus.port).start()
    yield upstream
    await upstream.stop()


def deaf_upstream(deaf: DeafUpstream, **kw: Any) -> dict[str, Any]:
    return {"name": "up", "protocol": "nucleus-ws", "url": deaf.ws_url,
            "flush_interval_s": 0.02, "timeout_s": 0.5, **kw}


async def stalls_then_delivers(agent: Any, deaf: DeafUpstream, fake: FakeNucleus,
                               events: int, error: str) -> None:
    """Send ``events`` events; wait for `/status` to show the failure (``error``) and a
    retry; then let the upstream read, and wait for every event to be delivered."""
    for p in range(0, events, 100):
        await send(agent, [event(i, pad=PAD) for i in range(p, min(p + 100, events))])
    last: dict[str, Any] = {}

    async def failed_and_retried() -> bool:
        last.update(await status_of(agent))
        return last["retries"] >= 1 and error in (last["last_error"] or "")
    try:
        await wait_for(failed_and_retried, 4)
    except AssertionError:
        raise AssertionError(f"no failure shown: {last}") from None
    assert deaf.deaf_connections >= 1
    deaf.deaf = False   # the next connection reaches a good upstream
    await wait_for(lambda: agent.spool.depth == 0, 5)
    assert set(fake.ids()) == set(range(events))
    assert await agent.spool.dead_letters() == []


async def test_an_upstream_that_stops_reading_fails_the_batches_in_flight(
        make_agent: Any, fast_backoff: Seams, deaf: DeafUpstream,
        fake_nucleus: FakeNucleus) -> None:
    """It takes the handshake, then reads nothing: the agent's frames fill the TCP window
    and its own buffers, and a send waits for room. Before the fix that send waited
    forever, and with it the key: `/status` said `sending`, with no error and no retry."""
    # 5.6 MB in up to 16 frames of 500 KB in flight: more than the path between them
    # holds (on loopback the agent's socket takes up to 4 MB, tcp_wmem).
    agent = await make_agent(upstreams=[deaf_upstream(deaf, max_in_flight=16)])
    await stalls_then_delivers(agent, deaf, fake_nucleus, 700,
                               "upstream stopped reading: no reportedIds for")


async def test_a_frame_that_cannot_leave_fails_its_send(
        make_agent: Any, deaf: DeafUpstream, fake_nucleus: FakeNucleus) -> None:
    """One frame in flight, larger than the path holds: its send itself must fail, there
    being no earlier frame whose acks could time out. On loopback a connection's send
    buffer takes megabytes, so the agent's uplinks get sockets with a small one, as a
    real network's connection starts with."""
    # Bounded: a connection closed gracefully with a frame stuck in it holds up the
    # session's close (before the fix, forever).
    async with asyncio.timeout(10), small_buffer_seams() as seams:
        agent = await make_agent(upstreams=[deaf_upstream(deaf, max_in_flight=1)],
                                 seams=seams)
        # 60 events of 8 KB: one 480 KB frame.
        await stalls_then_delivers(agent, deaf, fake_nucleus, 60,
                                   "upstream stopped reading: a frame could not be sent "
                                   "within 0.5s")
        await agent.stop()   # before its session closes


def _small_send_buffer(addr: Any) -> socket.socket:
    family, kind, proto, _, _ = addr
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return sock


@contextlib.asynccontextmanager
async def small_buffer_seams() -> AsyncIterator[Seams]:
    """Seams whose nucleus-ws uplinks send on sockets with a small send buffer (on loopback
    one takes megabytes; a real network's connection starts small), through a session of
    their own, closed at the end."""
    connector = aiohttp.TCPConnector(socket_factory=_small_send_buffer)
    async with aiohttp.ClientSession(connector=connector) as session:
        def uplink(cfg: UpstreamConfig, key: str, _: aiohttp.ClientSession,
                   machine_id: str) -> NucleusWsUplink:
            return NucleusWsUplink(cfg, key, session, machine_id)
        yield Seams(make_uplink=uplink, backoff=FAST_BACKOFF)


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_on_a_refused_handshake_is_honoured(
        make_agent: Any, faulty: FaultyUpstream, status: int) -> None:
    """As over HTTP: the upstream's Retry-After, not the backoff (0.01 to 0.02 s here),
    says when the key tries again. Before the fix it was ignored."""
    faulty.connect_script = [Fault("status", status, {"Retry-After": "30"})]
    timing, seams = manual()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws")], seams=seams)
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: agent.forwarding.states["up"].retries == 1)
    assert timing.pending() == [30.0]
    assert f"HTTP {status}" in ((await status_of(agent))["last_error"] or "")
    timing.advance(29.9)
    assert len(faulty.requests) == 1   # the refused handshake alone
    timing.advance(0.1)
    await drained(agent, faulty, 5)


async def test_a_flood_of_replies_that_are_not_json_is_logged_once_and_counted(
        make_agent: Any, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture) -> None:
    """Each is ignored, as before; but any upstream (or a proxy before it) could send
    them by the thousand, and each wrote a warning of its own."""
    faulty.script = [Fault("noise", times=500)]
    caplog.set_level(logging.WARNING)
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws")])
    await send(agent, [event(i) for i in range(3)])
    await drained(agent, faulty, 3)
    lines = [r.getMessage() for r in caplog.records if "not JSON" in r.getMessage()]
    assert len(lines) == 1, lines[:3]   # once a minute
    assert (await status_of(agent))["unreadable_replies"] == 500


@pytest.mark.parametrize("code", [1000, 1001, 1008, 1009, 1011, 4001])
async def test_an_upstream_s_close_mid_batch_says_its_code_and_reason(
        make_agent: Any, faulty: FaultyUpstream, code: int,
        caplog: pytest.LogCaptureFixture) -> None:
    """An upstream that closes the connection mid-batch says why: its close code and reason
    (1008 for a key it refuses, 1009 for a frame over its size limit, 4xxx of its own).
    /status and the log said only "connection lost before all acks arrived", the same for
    a restart as for a frame it will never take (sent again, and closed again, for ever).
    What it acknowledged before the close is not sent again; the rest is, and arrives."""
    caplog.set_level(logging.WARNING)
    secret = "nk-upstream-key-7q2"
    faulty.script = [Fault("close", close_code=code,
                           reason=f"refused by policy, key {secret}".encode())]
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws", key=secret)])
    await send(agent, [event(i) for i in range(6)])
    await drained(agent, faulty, 6)
    closed, *rest = faulty.requests
    assert closed.fault == "close" and closed.acked == [0, 1, 2]
    assert sorted(m for r in rest for m in marks(r.events)) == [3, 4, 5]
    up = await status_of(agent)
    # A 1009 halves the frames: the protocol working, no failure (its warning says why).
    halved = code == 1009
    assert up["retries"] == (0 if halved else 1)
    logged = [r for r in caplog.records
              if ("as too big" if halved else "retrying") in r.getMessage()]
    assert logged
    for record in logged:
        RedactingFilter().filter(record)   # as the agent's log handler does
    errors = [] if halved else [up["last_error"] or ""]
    for shown in (*errors, *(r.getMessage() for r in logged)):
        assert f"close code {code}" in shown and "refused by policy" in shown, shown
        assert secret not in shown


async def test_frames_over_the_upstream_s_size_limit_are_made_smaller_until_they_fit(
        make_agent: Any, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    """An upstream that takes websocket frames up to a size and closes the connection with
    1009 for a longer one (aiohttp's max_msg_size, here). Before the fix the same frame
    went again at every retry and was closed again, for ever: the hint in status to lower
    batch_max_bytes was all. Now each 1009 halves the frames sent to that upstream (status
    shows the limit, the log says so once), until they fit; an event the upstream takes
    in no frame at all is a dead letter, with the upstream's close as its reason; and the
    events after it are delivered, in order."""
    caplog.set_level(logging.WARNING)
    faulty.max_frame = 30_000   # three of these 8 KB events, not four
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws", batch_max_events=100)])
    await send(agent, [event(i, pad=PAD) for i in range(20)]
               + [event(20, pad=PAD * 5), event(21, pad=PAD)])
    await wait_for(lambda: agent.spool.depth == 0, timeout=20)
    assert delivered(faulty) == Counter([*range(20), 21])
    (letter,) = await agent.spool.dead_letters()
    assert "close code 1009" in letter["reason"], letter
    arrived = [m for r in faulty.requests for m in marks(r.events) if r.acked]
    assert arrived == sorted(arrived)
    up = await status_of(agent)
    assert up["frame_limit_bytes"] is not None and up["frame_limit_bytes"] <= 30_000, up
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        assert f"frames at most {size(up['frame_limit_bytes'])}" in render(await r.json())
    shrunk = [r.getMessage() for r in caplog.records if "batches to it are now" in r.getMessage()]
    assert len(shrunk) >= 2 and f"at most {up['frame_limit_bytes']} bytes" in shrunk[-1], shrunk
    cfg = upstream(faulty, "nucleus-ws", batch_max_events=100)
    write_config(Path(agent.config_path), tmp_path / "spool.db", upstreams=[cfg])
    await agent.reload()   # the same upstream: its limit holds
    assert (await status_of(agent))["frame_limit_bytes"] == up["frame_limit_bytes"]
    write_config(Path(agent.config_path), tmp_path / "spool.db",
                 upstreams=[{**cfg, "key": "another"}])
    await agent.reload()   # another upstream by that name: it may take more
    assert (await status_of(agent))["frame_limit_bytes"] is None


async def test_a_frame_refused_as_too_big_is_no_failure_to_back_off_from(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """Each 1009 halves the frames: the protocol working, not the upstream failing. Each
    was counted as a failure: a backoff that doubled at every halving (frames of 160 KB
    down to 20 KB: three in a row, seconds lost, the key shown in backoff), `retries`
    (which alerts watch) rising, and the upstream probed as if unreachable. Here the
    forwarder's clock never moves: any backoff would hold the key for good."""
    timing, seams = manual()
    faulty.max_frame = 30_000   # three of these 8 KB events, not four
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws", batch_max_events=100)],
                             seams=seams)
    await send(agent, [event(i, pad=PAD) for i in range(20)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: agent.spool.depth == 0 or state.retries > 0)
    assert delivered(faulty) == Counter(range(20)) and state.retries == 0, state
    assert state.frame_limit_bytes is not None and state.frame_limit_bytes <= 30_000, state


async def test_a_frame_refused_as_too_big_keeps_the_key_s_backoff_step(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A 1009's halving is neither a failure nor progress: the key's next loop goes on
    from its backoff step. It started again from the first step: an upstream failing for
    a while, then closing a frame as too big, was retried within a second at its next
    failure, as if it had just begun to fail."""
    timing, seams = manual(Backoff(base_s=1.0, cap_s=100.0))
    refused = Fault("status", 503)
    # Three handshakes refused, one taken (its frame closed with 1009), one refused.
    faulty.connect_script = [refused, refused, refused, Fault("timeout"), refused]
    faulty.max_frame = 30_000   # three of these 8 KB events, not four
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws", batch_max_events=100)],
                             seams=seams)
    await send(agent, [event(i, pad=PAD) for i in range(20)])
    state = agent.forwarding.states["up"]
    for failed in range(1, 4):
        await wait_for(lambda: state.retries == failed and bool(timing.pending()))
        timing.advance(timing.pending()[0])
    await wait_for(lambda: state.retries == 4 and bool(timing.pending()))
    assert state.frame_limit_bytes is not None   # halved between the third and the fourth
    assert timing.pending()[0] >= 4.0, timing.pending()   # the fourth step: 4 to 8 s


async def test_a_hundred_open_websockets_hold_up_no_other_key_or_upstream(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """Each Nucleus key's loop holds its own websocket while its queue stays empty for
    `flush_interval_s` (raised, as the docs advise, to keep connections open), and up to
    256 loops run per upstream. The upstreams' shared client session had aiohttp's default
    cap of 100 connections, websockets included: with 100 apps connected, the 101st app's
    handshake, and every request to another upstream (a Segment one, here), waited for a
    connection that no loop gave back, until `timeout_s`, then failed and backed off;
    nothing of theirs was sent though both upstreams were fine."""
    apps = [f"app{i}" for i in range(101)]
    ws = upstream(faulty, "nucleus-ws", name="ws", keys=apps, batch_max_events=1,
                  flush_interval_s=3600, timeout_s=1)
    segment = upstream(faulty, "segment-http", name="seg", keys=["*"], timeout_s=1)
    agent = await make_agent(upstreams=[ws, segment])
    states = agent.forwarding.states
    for i, app in enumerate(apps[:100]):
        await send(agent, [event(i)], key=app)
    await wait_for(lambda: len(faulty.acked_ids()) == 100)   # 100 websockets stay open
    await send(agent, [event(100)], key=apps[100])
    auth = {"Authorization": "Basic " + base64.b64encode(b"wk:").decode()}
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{agent.port}/v1/batch", headers=auth,
            json={"batch": [{"type": "track", "event": "e", "userId": "u",
                             "messageId": "seg-1"}]}) as r:
        assert r.status == 200, await r.text()
    # Until both are delivered, or either upstream fails (before the fix: in 1 s).
    await wait_for(lambda: agent.spool.depth == 0
                   or any(up.last_error is not None for up in states.values()))
    assert [(up.name, up.last_error) for up in states.values()] == [("ws", None),
                                                                     ("seg", None)]
    assert agent.spool.depth == 0
    assert "seg-1" in faulty.acked_ids() and 100 in faulty.acked_ids()


async def test_a_reply_without_reported_ids_is_named_in_the_error_and_logged(
        make_agent: Any, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture) -> None:
    """An upstream that answers a frame with JSON of its own ({"error": ...}) instead of
    reportedIds: the frame is retried, as before, and last_error and the log now say what
    the upstream said. It was dropped unsaid, and last_error said only "no reportedIds
    within 0.6s", as if the upstream had said nothing."""
    faulty.script = [Fault("malformed", body=b'{"error": "app over its quota"}')]
    caplog.set_level(logging.INFO)
    timing, seams = manual()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws")], seams=seams)
    await send(agent, [event(i) for i in range(3)])
    await wait_for(lambda: agent.forwarding.states["up"].retries == 1)
    error = (await status_of(agent))["last_error"] or ""
    assert "no reportedIds" in error and '{"error": "app over its quota"}' in error, error
    lines = [r.getMessage() for r in caplog.records if "without reportedIds" in r.getMessage()]
    assert len(lines) == 1 and "app over its quota" in lines[0], lines
    (delay,) = timing.pending()
    timing.advance(delay)
    await drained(agent, faulty, 3)



@pytest.mark.parametrize("body", [b'{"error": "app over its quota"}',
                                  b'{"reportedIds": [null, null, null]}'])
async def test_a_frame_answered_with_no_ack_is_no_sign_of_a_slow_link(
        make_agent: Any, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture,
        body: bytes) -> None:
    """The upstream answers a frame at once, with JSON that acknowledges nothing (an error of
    its own, reportedIds that are no ids): retried, as over HTTP, in frames as large. It was
    taken for a frame that got no answer within timeout_s: the batches to the upstream were
    halved, with a warning of "no answer ... (a slow link?)", at each such answer, down to
    one event a frame, though every answer came at once."""
    faulty.script = [Fault("malformed", body=body)]
    caplog.set_level(logging.INFO)
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws")])
    await send(agent, [event(i) for i in range(3)])
    await drained(agent, faulty, 3)
    assert [len(r.events) for r in faulty.requests] == [3, 3]
    assert agent.forwarding.states["up"].slow_limit_bytes is None
    assert not [r for r in caplog.records if "slow link" in r.getMessage()]

async def test_frames_answered_after_a_reply_that_is_no_answer_are_acknowledged_once(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """The upstream answers the first of several frames in flight with JSON of its own
    ({"error": ...}), and each later one with its ids, once and in order.
    Those later frames were taken as unanswered, since the reply that is no answer is not
    counted and their answers were matched to the first frame: their events, stored and
    acknowledged, were sent again (stored twice) once timeout_s ran out."""
    faulty.script = [Fault("malformed", body=b'{"error": "app over its quota"}')]
    # timeout_s: the later frames' answers are read well before the first frame's wait
    # ends and closes the connection (which would send them again, rightly).
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws", batch_max_events=1,
                                                 max_in_flight=4, timeout_s=3)])
    await send(agent, [event(i) for i in range(4)])
    await drained(agent, faulty, 4)
    assert delivered(faulty) == Counter(range(4))


class _ErrsOnFirst(FaultyUpstream):
    """Answers each frame holding event 0 with {"error": ...} ``errors`` times; every other
    frame, and event 0's after those, as FaultyUpstream does."""

    def __init__(self, errors: int) -> None:
        super().__init__()
        self.errors = errors

    def _next(self, events: list[dict[str, Any]]) -> Fault | None:
        if self.errors and any(ev["id"] == 0 for ev in events):
            self.errors -= 1
            return Fault("malformed", body=b'{"error": "try again later"}')
        return super()._next(events)


async def test_a_frame_answered_with_an_error_as_later_frames_are_answered_gives_nothing_up(
        make_agent: Any, fast_backoff: Seams) -> None:
    """A reply that is no answer ({"error": ...}) weighs nothing against its frame's events,
    as over HTTP. With frames after it in flight and answered, the count of replies was
    taken past the frame it answered, as if that frame had been answered leaving its event
    out: the event, answered so again and again, went to dead letters."""
    fake = await _ErrsOnFirst(OMITTED_LIMIT + 1).start()
    try:
        agent = await make_agent(upstreams=[upstream(fake, "nucleus-ws", batch_max_events=1,
                                                     max_in_flight=4, timeout_s=0.3)])
        for n in range(OMITTED_LIMIT + 1):   # each time, events to go after event 0's frame

            async def answered_or_given_up(n: int = n) -> bool:
                return fake.errors == OMITTED_LIMIT - n or bool(await agent.spool.dead_letters())
            await send(agent, [event(i) for i in range(4 * n, 4 * n + 4)])
            await wait_for(answered_or_given_up)
        assert await agent.spool.dead_letters() == []
        await drained(agent, fake, 4 * (OMITTED_LIMIT + 1))
    finally:
        await fake.stop()


@pytest.mark.parametrize("body", [b'{"reportedIds": null}', b'{"reportedIds": {"0": true}}'])
async def test_a_reply_whose_reported_ids_is_no_list_gives_nothing_up(
        make_agent: Any, faulty: FaultyUpstream, body: bytes) -> None:
    """An upstream that answers each frame with a `reportedIds` that is no list (null, a
    string, an object) acknowledges nothing, and weighs nothing against the frame's events,
    as over HTTP: the event is kept and sent again. Counted as an answer that left it out,
    it went to dead letters after six such replies."""
    faulty.script = [Fault("malformed", body=body)] * (OMITTED_LIMIT + 1)
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws", timeout_s=0.15)])
    await send(agent, [event(0)])
    await drained(agent, faulty, 1)
    assert [r.fault for r in faulty.requests] == ["malformed"] * (OMITTED_LIMIT + 1) + ["ok"]


class _Repeater:
    """A websocket upstream whose first connection answers the first frame, stops reading
    (the frames after it wait for room) and, once told (``repeat``), sends that answer a
    second time; every later connection answers each frame properly. Each frame's events
    (``frames``, with their connection's number) as received."""

    def __init__(self) -> None:
        self.server = LoopbackServer()
        self.repeat = asyncio.Event()
        self.frames: list[tuple[int, list[dict[str, Any]]]] = []
        self.connections = 0

    async def start(self) -> _Repeater:
        app = web.Application()
        app.router.add_get("/app/{key}/track", self._ws)
        await self.server._serve(app)
        return self

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self.connections += 1
        conn = self.connections
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.server._sockets.add(ws)
        async for msg in ws:
            events = orjson.loads(msg.data)["data"]
            self.frames.append((conn, events))
            reply = orjson.dumps({"reportedIds": [ev["id"] for ev in events]}).decode()
            await ws.send_str(reply)
            if conn == 1:
                assert request.transport is not None
                request.transport.pause_reading()   # reads nothing more
                await self.repeat.wait()
                await ws.send_str(reply)            # the same answer, again
                await ws.receive()                  # until the agent gives up on it
                break
        return ws


async def test_a_repeated_answer_does_not_acknowledge_a_later_event_not_yet_sent(
        make_agent: Any) -> None:
    """Real modules reuse ids: B has the id of A, sent and acknowledged before it. B was
    prepared (its id in flight) and waited for the frame before it to leave when the
    upstream sent A's answer again: it was taken as B's, and B deleted though it never
    left the agent (the connection then failed, and B was never sent again)."""
    fake = await _Repeater().start()
    async with asyncio.timeout(10), small_buffer_seams() as seams:
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": "nucleus-ws", "url": fake.server.ws_url,
            "flush_interval_s": 0.02, "timeout_s": 0.5, "batch_max_events": 1}],
            seams=seams)
        try:
            # A (id 5); C, 400 KB, that cannot leave; B, another event with id 5.
            await send(agent, [event(5), event(6, pad="x" * 400_000),
                               {**event(5), "name": "b", "payload": {"mark": "mk-7-"}}])
            state = agent.forwarding.states["up"]
            await wait_for(lambda: state.sent == 3)   # B waits for C to leave
            fake.repeat.set()
            await wait_for(lambda: agent.spool.depth == 0)
            later = [m for conn, events in fake.frames if conn > 1 for m in marks(events)]
            assert later == [6, 7], fake.frames   # C, and B: sent again
        finally:
            await agent.stop()   # before its session closes
            await fake.server.stop()


class _RepeatsMidFrame(RawUpstream):
    """A websocket upstream whose first connection answers its first frame, reads the head
    of the second and then sends that first answer again, reading nothing more: the rest of
    the second frame waits for room, never to arrive. Every later connection is relayed to
    ``target_port`` (a good upstream)."""

    def __init__(self, target_port: int) -> None:
        super().__init__()
        self.target_port = target_port

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections > 1:
            await self.relay(reader, writer, self.target_port)
            return
        await accept_websocket(reader, writer)
        size, mask = await _frame_head(reader)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(await reader.readexactly(size)))
        reply = orjson.dumps({"reportedIds": [ev["id"] for ev in orjson.loads(data)["data"]]})
        answer = bytes([0x81, len(reply)]) + reply   # a text frame, short, unmasked
        writer.write(answer)
        await _frame_head(reader)   # the second frame is on its way
        writer.write(answer)        # the first one's answer, again
        transport = writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()
        await writer.wait_closed()  # until the agent gives up on it


async def _frame_head(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """A client's frame head: its payload's length and its mask."""
    first = await reader.readexactly(2)
    size = first[1] & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await reader.readexactly(8))[0]
    return size, await reader.readexactly(4)


async def test_a_repeated_answer_does_not_acknowledge_an_event_whose_frame_is_still_going(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """As above, with B's frame already on its way when the answer comes again: B was
    taken as acknowledged though the upstream had only its first bytes, and once its send
    failed (the upstream read no more) it was deleted, never delivered."""
    fake = await _RepeatsMidFrame(fake_nucleus.port).start()
    async with asyncio.timeout(10), small_buffer_seams() as seams:
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": "nucleus-ws", "url": fake.ws_url,
            "flush_interval_s": 0.02, "timeout_s": 0.5, "batch_max_events": 1}],
            seams=seams)
        try:
            # A (id 5), then B (id 5 too: it waits for A's answer), 400 KB: its frame
            # cannot arrive whole once the upstream stops reading.
            await send(agent, [event(5), {**event(5), "name": "b",
                                          "payload": {"mark": "mk-7-", "pad": "x" * 400_000}}])
            await wait_for(lambda: agent.spool.depth == 0)
            assert marks(fake_nucleus.events) == [7]   # B, sent again on a new connection
            assert await agent.spool.dead_letters() == []
        finally:
            await agent.stop()   # before its session closes
            await fake.stop()


class _StaleIdInAnswer(LoopbackServer):
    """A websocket upstream whose first connection answers its first frame, holds the
    answer to the second until it has read the third, then answers the second with its
    own id and the first frame's again (a stale id), and closes without storing the
    third. Every later connection answers each frame. What it stored: the events it
    acknowledged in the answer to their own frame. ``split``: each id of an answer in a
    message of its own (an upstream that acknowledges each event as it stores it), the
    stale one first. ``news``: a message that answers no frame (an update's news, as
    Nucleus servers push to modules) just before that answer."""

    def __init__(self, split: bool = False, news: bool = False) -> None:
        super().__init__()
        self.stored: list[dict[str, Any]] = []
        self.connections = 0
        self.split = split
        self.news = news

    async def start(self) -> _StaleIdInAnswer:
        app = web.Application()
        app.router.add_get("/app/{key}/track", self._ws)
        await self._serve(app)
        return self

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self.connections += 1
        conn = self.connections
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        frames: list[list[dict[str, Any]]] = []
        async for msg in ws:
            frames.append(orjson.loads(msg.data)["data"])
            if conn > 1 or len(frames) == 1:
                await self._answer(ws, frames[-1])
            elif len(frames) == 3:   # the third is here: the second's answer, stale id and all
                if self.news:
                    await ws.send_str('{"latestVersion": "0.9.1"}')
                await self._answer(ws, frames[1], stale=[ev["id"] for ev in frames[0]])
                await ws.close()
        return ws

    async def _answer(self, ws: web.WebSocketResponse, events: list[dict[str, Any]],
                      stale: list[Any] | None = None) -> None:
        self.stored += events
        ids = [*(stale or ()), *(ev["id"] for ev in events)]
        for part in ([[i] for i in ids] if self.split else [ids]):
            await ws.send_str(orjson.dumps({"reportedIds": part}).decode())


@pytest.mark.parametrize(("split", "news"), [(False, False), (True, False), (True, True)],
                         ids=["one-message", "a-message-an-id", "a-message-an-id-after-news"])
async def test_a_stale_id_in_an_earlier_frame_s_answer_does_not_acknowledge_a_later_one(
        make_agent: Any, fast_backoff: Seams, split: bool, news: bool) -> None:
    """Real modules reuse ids: B has the id of A, acknowledged before B went. The answer to
    the frame sent between them (C's) named A's id again with C's: it was taken as B's
    acknowledgement, though upstreams answer frames in order and C's answer is no answer
    to B, and B was deleted unstored (the upstream then closed the connection). So too
    with C's answer in a message an id, the stale one alone first: that message was
    taken for B's answer, as the first frame not answered that it names an event of. And
    after news that answers no frame ({"latestVersion": ...}): it was counted as a reply
    that may have answered C, so the stale id alone was again taken for B's answer."""
    fake = await _StaleIdInAnswer(split, news).start()
    async with asyncio.timeout(10):
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": "nucleus-ws", "url": fake.ws_url,
            "flush_interval_s": 0.02, "timeout_s": 5, "batch_max_events": 1}])
        try:
            # A (id 5), C (id 6), then B (id 5 too: its frame goes once A's answer came).
            await send(agent, [event(1) | {"id": 5}, event(2) | {"id": 6},
                               event(3) | {"id": 5, "name": "b"}])
            await wait_for(lambda: agent.spool.depth == 0)
            assert sorted(marks(fake.stored)) == [1, 2, 3]
        finally:
            await agent.stop()   # before its session closes
            await fake.stop()


class _ClosesAndReadsNoMore(RawUpstream):
    """A websocket upstream (a wedged one, or a proxy before one) that reads the head of
    the first frame of each connection, then reads nothing more and sends a close frame,
    and keeps the connection open: part of the frame waits in the agent's buffers."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_websocket(reader, writer)
        await _frame_head(reader)
        transport = writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()
        writer.write(bytes([0x88, 2]) + struct.pack("!H", 1001))   # going away
        await writer.wait_closed()   # until the agent cuts it (or stop())

    def agent_side(self) -> int:
        """The agent's connections to it still open (this process holds both ends)."""
        return sum(1 for c in psutil.Process().net_connections("tcp")
                   if c.raddr and c.raddr.port == self.port)


async def test_connections_an_upstream_closed_while_it_read_no_more_are_not_left_open(
        make_agent: Any) -> None:
    """The upstream's close frame was answered and the connection closed gracefully, which
    waits for the agent's unsent bytes to go first: to an upstream that reads no more,
    never. Each retry left one more connection open, with its buffers, for good."""
    fake = await _ClosesAndReadsNoMore().start()
    async with asyncio.timeout(20), small_buffer_seams() as seams:
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": "nucleus-ws", "url": fake.ws_url,
            "flush_interval_s": 0.02, "timeout_s": 5}],
            seams=seams)
        try:
            # One frame of about 40 KB: more than the path holds, less than a send waits
            # for room for (aiohttp's 64 KB).
            await send(agent, [event(i, pad="x" * 8000) for i in range(5)])
            await wait_for(lambda: fake.connections >= 4)
            # Each connection was done with before the next one opened: this one alone.
            assert fake.agent_side() <= 1
            assert "close code 1001" in (agent.forwarding.states["up"].last_error or "")
        finally:
            await agent.stop()   # before its session closes
            await fake.stop()


async def test_a_handshake_left_unanswered_says_so_in_last_error(make_agent: Any,
                                                                fast_backoff: Seams) -> None:
    """The upstream's host takes the connection but never answers the websocket handshake
    (a wedged server, a proxy holding it): last_error said `connect failed: TimeoutError`,
    naming neither what timed out nor the setting that bounds it."""
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": "nucleus-ws", "url": f"ws://127.0.0.1:{port}",
            "flush_interval_s": 0.02, "timeout_s": 0.2}])
        state = agent.forwarding.states["up"]
        await send(agent, [event(0)])
        await wait_for(lambda: state.retries >= 1)
        error = state.last_error or ""
        assert "handshake" in error and "0.2s (timeout_s)" in error, error
        assert agent.spool.depth == 1
    finally:
        done.set()
        server.close()


async def test_a_timeout_s_past_aiohttps_own_bound_is_the_one_a_handshake_gets(
        make_agent: Any, fast_backoff: Seams, monkeypatch: pytest.MonkeyPatch) -> None:
    """An aiohttp session bounds each request at 300 s in all (its connect at 30 s) unless
    told otherwise, and a websocket's handshake is such a request: with timeout_s past
    that, a handshake left unanswered failed at aiohttp's bound, as `connect failed:
    TimeoutError`, naming neither. Here aiohttp's default is 0.1 s and timeout_s 1 s (for
    300 s and more): the handshake waits timeout_s, and last_error says so."""
    monkeypatch.setattr(aiohttp.client, "DEFAULT_TIMEOUT",
                        aiohttp.ClientTimeout(total=0.1, sock_connect=0.1))
    answer = asyncio.Event()

    async def never(request: web.Request) -> web.StreamResponse:
        await answer.wait()
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/{path:.*}", never)
    server = LoopbackServer()
    await server._serve(app)
    try:
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": "nucleus-ws", "url": server.ws_url,
            "flush_interval_s": 0.02, "timeout_s": 1}])
        state = agent.forwarding.states["up"]
        await send(agent, [event(0)])
        await wait_for(lambda: state.retries >= 1)
        error = state.last_error or ""
        assert "no websocket handshake within 1s (timeout_s)" in error, error
        assert agent.spool.depth == 1
    finally:
        answer.set()
        await server.stop()
