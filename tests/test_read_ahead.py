"""The batch that goes next is read while the one before is in flight.

segment-http sends one batch at a time (FIFO per key), and its drain waited out each
spool read and each batch's preparation in series with the upstream. Now the loop reads
and prepares the next batch while the upstream works on the one before
(``StreamForwarder._read_ahead``). What it read is used only if nothing was sent, resent
or changed since; these tests hold the upstream's answer until the next batch is read,
then answer, and check what the upstream received, in order.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from agent.forwarder.slots import BATCHES_IN_FLIGHT
from tests.fakes.loopback_server import LoopbackServer, serving
from tests.waiting import wait_for

BATCH = 500   # batch_max_events' default
AUTH = {"Authorization": "Basic " + base64.b64encode(b"k:").decode()}


class HeldCollector:
    """A Segment collector that holds each request until the test answers it (with a
    status; 0: the connection closed instead)."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[tuple[list[str], asyncio.Future[int]]] = asyncio.Queue()
        self.stored: list[str] = []   # messageIds of the batches answered 200, in order
        self.received: list[list[str]] = []   # every request's messageIds, in order

    async def batch(self, request: web.Request) -> web.Response:
        ids = [ev["messageId"] for ev in orjson.loads(await request.read())["batch"]]
        self.received.append(ids)
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self.requests.put((ids, answer))
        status = await answer
        if status == 0:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if status == 200:
            self.stored.extend(ids)
            return web.json_response({"success": True})
        return web.json_response({"error": "no"}, status=status)

    async def next(self) -> tuple[list[str], asyncio.Future[int]]:
        return await asyncio.wait_for(self.requests.get(), 10)

    async def answer_all(self, status: int = 200) -> None:
        """Answer every request from now on, until everything is stored."""
        while True:
            _, answer = await self.requests.get()
            answer.set_result(status)


async def post(agent: Any, batch: list[dict[str, Any]]) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{agent.port}/v1/batch", json={"batch": batch},
            headers=AUTH) as r:
        assert r.status == 200, await r.text()


@asynccontextmanager
async def draining(make_agent: Any, events: int) -> AsyncIterator[tuple[Any, HeldCollector]]:
    """An agent with ``events`` Segment events of one key queued for a held collector."""
    up = HeldCollector()
    async with serving("/v1/batch", up.batch) as url:
        agent = await make_agent(upstreams=[{
            "name": "seg", "protocol": "segment-http", "url": url,
            "flush_interval_s": 3600, "timeout_s": 30}])
        await post(agent, [{"type": "track", "event": "e", "userId": "u", "messageId": str(i)}
                           for i in range(events)])
        yield agent, up


def ids(lo: int, hi: int) -> list[str]:
    return [str(i) for i in range(lo, hi)]


async def read_ahead(agent: Any) -> None:
    await wait_for(lambda: agent.forwarding.loops["k"].read_ahead, timeout=10)


async def drained(agent: Any, up: HeldCollector, answering: asyncio.Task[None]) -> None:
    try:
        await wait_for(lambda: agent.spool.depth == 0, timeout=20)
    finally:
        answering.cancel()
    # Every slot is back: what was read ahead gave its own back too.
    await wait_for(lambda: agent.forwarding._slots["seg"].free == BATCHES_IN_FLIGHT)


# (the first batch's answer, events queued, the batches the collector receives): taken
# (the second batch, read meanwhile, goes next); failed (the first is sent again before
# the second, read again in its turn); refused (it is split, its halves go and are taken,
# and only then the second).
ANSWERS = {
    "taken": (200, 3 * BATCH, [ids(0, 500), ids(500, 1000), ids(1000, 1500)]),
    "failed": (503, 3 * BATCH, [ids(0, 500), ids(0, 500), ids(500, 1000), ids(1000, 1500)]),
    "refused": (400, 2 * BATCH, [ids(0, 500), ids(0, 250), ids(250, 500), ids(500, 1000)]),
}


@pytest.mark.parametrize("answered", ANSWERS)
async def test_the_batch_read_while_one_is_in_flight_goes_in_its_turn(
        make_agent: Any, answered: str) -> None:
    status, events, received = ANSWERS[answered]
    async with draining(make_agent, events) as (agent, up):
        first, answer = await up.next()
        assert first == ids(0, BATCH)
        await read_ahead(agent)   # the second batch, while the first waits for its answer
        answer.set_result(status)
        answering = asyncio.create_task(up.answer_all())
        await drained(agent, up, answering)
    assert up.received == received
    assert up.stored == ids(0, events)


# (batches answered before the high event comes, events queued, the batches received): the
# second batch's read ahead starts from the rows the first one's read left (no spool read).
HIGH_AFTER = {
    "first read ahead": (0, 2 * BATCH, [ids(0, 500), ["high", *ids(500, 999)]]),
    "read ahead from left rows": (1, 3 * BATCH, [ids(0, 500), ids(500, 1000),
                                                 ["high", *ids(1000, 1499)]]),
}


@pytest.mark.parametrize("case", HIGH_AFTER)
async def test_a_high_event_that_comes_after_the_read_still_goes_first(
        make_agent: Any, case: str) -> None:
    """A high event (an "Application Error") queued after the next batch was read goes
    in the batch after the one in flight, as without the read ahead."""
    before, events, received = HIGH_AFTER[case]
    async with draining(make_agent, events) as (agent, up):
        _, answer = await up.next()
        for _ in range(before):
            await read_ahead(agent)
            answer.set_result(200)
            _, answer = await up.next()
        await read_ahead(agent)
        await post(agent, [{"type": "track", "event": "Application Error", "userId": "u",
                            "messageId": "high"}])
        answer.set_result(200)
        answering = asyncio.create_task(up.answer_all())
        try:
            # The last normal event, alone, waits for the flush interval.
            await wait_for(lambda: agent.spool.depth == 1, timeout=20)
        finally:
            answering.cancel()
    assert up.received == received


class HeldNucleus(LoopbackServer):
    """A Nucleus websocket upstream that holds each frame's ack until the test answers;
    and each handshake while ``accepting`` is clear. ``drop_next``: the connection is
    closed right after the next ack (an idle drop: every frame on it acknowledged)."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: asyncio.Queue[tuple[list[Any], asyncio.Future[None]]] = asyncio.Queue()
        self.received: list[list[Any]] = []
        self.handshakes = 0   # asked for, held or not
        self.accepting = asyncio.Event()
        self.accepting.set()
        self.drop_next = False

    async def track(self, request: web.Request) -> web.WebSocketResponse:
        self.handshakes += 1
        await self.accepting.wait()
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        async for msg in ws:
            ids = [ev["id"] for ev in orjson.loads(msg.data)["data"]
                   if ev.get("type") != "heartbeat"]
            if not ids:
                continue
            self.received.append(ids)
            answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            await self.frames.put((ids, answer))
            await answer
            # The close frame written with the ack, no await between: the agent reads both
            # at once, so it finds the connection closed when it next sends.
            await ws.send_str(orjson.dumps({"reportedIds": ids}).decode())
            if self.drop_next:
                self.drop_next = False
                await ws.close()
        return ws

    async def start(self) -> HeldNucleus:
        app = web.Application()
        app.router.add_get("/app/{key}/track", self.track)
        await self._serve(app)
        return self


HIGH_ERROR = {"type": "error", "name": "boom", "id": "high", "sessionId": 1}


async def _post_nucleus(agent: Any, data: list[dict[str, Any]]) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{agent.port}/app/k/track",
                          json={"data": data}) as r:
            assert r.status == 200, await r.text()


async def _one_frame_in_flight(make_agent: Any, up: HeldNucleus,
                               events: int) -> tuple[Any, asyncio.Future[None]]:
    """An agent sending to ``up`` one frame at a time, ``events`` Nucleus events stored and
    the first frame held: the agent and that frame's answer."""
    agent = await make_agent(upstreams=[{
        "name": "n", "protocol": "nucleus-ws", "url": up.ws_url, "max_in_flight": 1,
        "flush_interval_s": 3600, "timeout_s": 30}])
    await _post_nucleus(agent, [{"type": "event", "name": "e", "id": i, "sessionId": 1}
                                for i in range(events)])
    _, answer = await asyncio.wait_for(up.frames.get(), 10)
    return agent, answer


async def test_nucleus_ws_one_frame_at_a_time_reads_ahead_but_prepares_when_it_sends(
        make_agent: Any) -> None:
    """With ``max_in_flight = 1`` a websocket sends one frame at a time too, and reads
    ahead; but its prepare puts the frame's ids in flight, so it prepares only when the
    frame goes: a read dropped (here, for a high event that came after it) would have left
    its ids in flight for ever, and the key stuck behind them."""
    up = await HeldNucleus().start()
    try:
        agent, answer = await _one_frame_in_flight(make_agent, up, 2 * BATCH)
        await read_ahead(agent)
        await _post_nucleus(agent, [HIGH_ERROR])
        answer.set_result(None)
        _, answer = await asyncio.wait_for(up.frames.get(), 10)
        answer.set_result(None)
        await wait_for(lambda: agent.spool.depth == 1, timeout=10)
    finally:
        await up.stop()
    assert up.received == [list(range(BATCH)), ["high", *range(BATCH, 2 * BATCH - 1)]]


async def test_nucleus_ws_a_high_event_stored_while_a_batch_read_ahead_connects_goes_first(
        make_agent: Any) -> None:
    """With ``max_in_flight = 1`` the read ahead reads two batches' events. The connection
    drops once the frame in flight is acknowledged, and the next frame (the read ahead's
    first batch) waits for a new one; an "error" event stored meanwhile goes in the frame
    after it, before the 500 normal events that read left, as a fresh read would send it."""
    up = await HeldNucleus().start()
    try:
        agent, answer = await _one_frame_in_flight(make_agent, up, 3 * BATCH)
        await read_ahead(agent)   # two batches: 500 to 1499
        up.accepting.clear()
        up.drop_next = True
        answer.set_result(None)
        await wait_for(lambda: up.handshakes == 2)   # the next frame's connect, held
        await _post_nucleus(agent, [HIGH_ERROR])
        up.accepting.set()
        for _ in range(2):
            _, answer = await asyncio.wait_for(up.frames.get(), 10)
            answer.set_result(None)
        # The last normal event, alone, waits for the flush interval.
        await wait_for(lambda: agent.spool.depth == 1, timeout=10)
    finally:
        up.accepting.set()
        await up.stop()
    assert up.received == [list(range(BATCH)), list(range(BATCH, 2 * BATCH)),
                           ["high", *range(2 * BATCH, 3 * BATCH - 1)]]


async def test_a_high_event_that_comes_while_a_high_one_is_dead_lettered_still_goes_first(
        make_agent: Any) -> None:
    """The read ahead was kept when the key's high depth was no higher than at the read.
    But a high event of the batch in flight that leaves the queue (here dead-lettered: the
    upstream refuses it alone) lowers that depth as a new high event raises it: the read
    was used, and the new "Application Error" went after 500 normal events read before it."""
    up = HeldCollector()
    async with serving("/v1/batch", up.batch) as url:
        agent = await make_agent(upstreams=[{
            "name": "seg", "protocol": "segment-http", "url": url,
            "flush_interval_s": 3600, "timeout_s": 30}])
        await post(agent, [{"type": "track", "event": "Application Error", "userId": "u",
                            "messageId": "bad"}]
                   + [{"type": "track", "event": "e", "userId": "u", "messageId": str(i)}
                      for i in range(2 * BATCH)])
        first, answer = await up.next()
        assert first == ["bad", *ids(0, BATCH - 1)]
        await read_ahead(agent)
        await post(agent, [{"type": "track", "event": "Application Error", "userId": "u",
                            "messageId": "high"}])
        answer.set_result(400)

        async def answer_all() -> None:   # "bad" is refused, alone or with others
            while True:
                sent, answer = await up.requests.get()
                answer.set_result(400 if "bad" in sent else 200)

        answering = asyncio.create_task(answer_all())
        try:
            # What is left waits for the flush interval: two events, however it went.
            await wait_for(lambda: agent.spool.depth == 2, timeout=20)
        finally:
            answering.cancel()
    after_split = next(sent for sent in up.received if "499" in sent)
    assert after_split[0] == "high", after_split[:3]


# A read ahead fetches two batches' rows: the second batch's read ahead starts from the rows
# the first left, without the spool. (the third batch's answer, the batches received.)
KEPT = {
    "taken": (200, [ids(0, 500), ids(500, 1000), ids(1000, 1500), ids(1500, 2000),
                    ids(2000, 2500)]),
    "failed": (503, [ids(0, 500), ids(500, 1000), ids(1000, 1500), ids(1000, 1500),
                     ids(1500, 2000), ids(2000, 2500)]),
}


@pytest.mark.parametrize("answered", KEPT)
async def test_a_batch_read_ahead_from_the_rows_the_last_read_left_goes_in_its_turn(
        make_agent: Any, answered: str) -> None:
    status, received = KEPT[answered]
    async with draining(make_agent, 5 * BATCH) as (agent, up):
        for expected in (ids(0, 500), ids(500, 1000)):
            sent, answer = await up.next()
            assert sent == expected
            await read_ahead(agent)
            answer.set_result(200)
        sent, answer = await up.next()
        assert sent == ids(1000, 1500)   # read ahead from the rows the read before left
        await read_ahead(agent)
        answer.set_result(status)
        answering = asyncio.create_task(up.answer_all())
        await drained(agent, up, answering)
    assert up.received == received
    assert up.stored == ids(0, 5 * BATCH)
