"""Nucleus uplinks against the fake server: frames, id uniqueness, heartbeats, drops."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType, web

from agent.families.event import NUCLEUS, SEGMENT
from agent.settings import UpstreamConfig
from agent.spool.types import Row
from agent.uplinks.base import Acked, Retry
from agent.uplinks.nucleus_frame import frame, match
from agent.uplinks.nucleus_ws import NucleusWsUplink
from agent.uplinks.prepare import Prepared
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.waiting import wait_for


def row(seq: int, body: dict[str, Any] | bytes, family: int = NUCLEUS) -> Row:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Row(seq, 1, family, 1_767_323_045_000, raw)


def ws_config(**kw: Any) -> UpstreamConfig:
    return UpstreamConfig(name="n", protocol="nucleus-ws", url="ws://127.0.0.1:9", **kw)


async def test_ws_prepare_splices_bodies_and_keeps_ids_unique() -> None:
    async with aiohttp.ClientSession() as session:
        up = NucleusWsUplink(ws_config(batch_max_events=10, batch_max_bytes=10_000), "app",
                             session, "m")
        rows = [row(1, {"id": 7, "name": "a"}), row(2, {"name": "no id"}), row(3, {"id": 7})]
        first = up.prepare(rows)
        assert [r.seq for r in first.rows] == [1, 2]          # id 7 is in flight: stop before it
        assert first.bodies[0] == rows[0].body               # spliced as stored
        assert orjson.loads(frame(first)) == {"data": [{"id": 7, "name": "a"},
                                                       {"name": "no id", "id": 2}]}
        assert up.prepare(rows[2:]).rows == ()
        assert match(up.in_flight, [7, 999, {"x": 1}]) == [1]   # unknown and odd ids are ignored
        assert [r.seq for r in up.prepare(rows[2:]).rows] == [3]


def test_match_takes_out_known_ids_and_skips_unknown_or_repeated_ones() -> None:
    in_flight: dict[Any, int] = {"a": 1, 2: 2, 3.5: 3, "d": 4}
    assert match(in_flight, ["a", 2]) == [1, 2] and in_flight == {3.5: 3, "d": 4}
    assert match(in_flight, [9, 3.5, "x", 3.5]) == [3]   # unknown, and a repeat of one taken
    assert match(in_flight, ["d", True, [1]]) == [4] and in_flight == {}


def test_frame_is_the_bodies_in_a_data_array() -> None:
    for n in (0, 1, 3):
        bodies = tuple(orjson.dumps({"id": i}) for i in range(n))
        framed = frame(Prepared((), tuple(range(1, n + 1)), bodies, tuple(range(n)), ()))
        assert orjson.loads(framed) == {"data": [{"id": i} for i in range(n)]}


async def test_ws_prepare_stops_before_an_id_repeated_within_the_rows() -> None:
    async with aiohttp.ClientSession() as session:
        up = NucleusWsUplink(ws_config(), "app", session, "m")
        first = up.prepare([row(1, {"id": "a"}), row(2, {"id": "b"}), row(3, {"id": "a"})])
        assert first.seqs == (1, 2) and up.in_flight == {"a": 1, "b": 2}


async def test_ws_prepare_respects_the_byte_cap() -> None:
    async with aiohttp.ClientSession() as session:
        up = NucleusWsUplink(ws_config(batch_max_events=100, batch_max_bytes=1024), "app",
                             session, "m")
        prepared = up.prepare([row(i, {"id": i, "pad": "x" * 300}) for i in range(1, 6)])
        assert len(prepared.rows) == 3 and len(frame(prepared)) <= 1024


async def test_segment_rows_are_mapped_with_seq_ids() -> None:
    seg = row(5, {"type": "track", "event": "Bought", "userId": "u", "messageId": "m1",
                  "properties": {"p": 1}}, family=SEGMENT)
    async with aiohttp.ClientSession() as session:
        up = NucleusWsUplink(ws_config(), "app", session, "m")
        (ev,) = orjson.loads(frame(up.prepare([seg])))["data"]
    assert ev["id"] == 5 and ev["type"] == "event" and ev["name"] == "Bought"
    assert ev["payload"]["p"] == 1


async def test_ws_uplink_heartbeats_when_idle_and_recovers_from_a_drop() -> None:
    fake = await FakeNucleus().start()
    cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=fake.url, timeout_s=2)
    async with aiohttp.ClientSession() as session:
        up = NucleusWsUplink(cfg, "app", session, "machine-1", heartbeat_s=0.2)
        batch = up.prepare([row(1, {"id": 1}), row(2, {"id": 2})])
        result = await up.send(batch)
        assert result == Acked((1, 2))
        await wait_for(lambda: bool(fake.heartbeats), timeout=5)   # one every 0.2 s idle
        assert fake.heartbeats[0] == {"type": "heartbeat",
                                                          "machineId": "machine-1"}
        fake.drop_after_frames = fake.frames + 1     # the next frame kills the connection
        lost = await up.send(up.prepare([row(3, {"id": 3})]))
        assert isinstance(lost, Retry) and lost.acked == ()
        fake.drop_after_frames = None
        # Until the forwarder has settled and closed, nothing opens a new connection:
        # a later batch must not overtake the one that failed (FIFO).
        early = await up.send(up.prepare([row(4, {"id": 4})]))
        assert isinstance(early, Retry) and fake.connections == 1
        await up.close()
        again = await up.send(up.prepare([row(3, {"id": 3})]))   # same id, new connection
        assert again == Acked((3,)) and fake.connections == 2
        await up.close()
    await fake.stop()


async def test_ws_uplink_times_out_on_missing_acks_and_ignores_junk() -> None:
    fake = await FakeNucleus().start()
    fake.reply_raw = b'{"reportedIds": "nope"} trailing'
    cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=fake.url, timeout_s=0.3)
    async with aiohttp.ClientSession() as session:
        up = NucleusWsUplink(cfg, "app", session, "m")
        result = await up.send(up.prepare([row(1, {"id": 1})]))
        assert isinstance(result, Retry) and result.acked == ()
        assert "no reportedIds" in result.error
        fake.reply_raw = None
        await up.close()   # as the forwarder does after a failure, before sending again
        assert await up.send(up.prepare([row(1, {"id": 1})])) == Acked((1,))
        await up.close()
    await fake.stop()


async def test_ws_acks_split_over_replies_make_a_later_frame_unanswered_not_left_out() -> None:
    """An upstream that acknowledges a frame's ids in several replies (one an id): a later
    frame with no reply within timeout_s is a link too slow for it (smaller frames follow),
    not one the upstream answered and left out. Each reply was counted as a frame's answer,
    so the later frame's events were weighed as left out, toward dead letters, and no
    smaller frames followed."""
    fake = await FakeNucleus().start()
    fake.split_replies = True
    fake.ack = lambda ev_id: ev_id in (1, 2)   # the second frame: no reply
    cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=fake.url, timeout_s=0.2)
    async with aiohttp.ClientSession() as session:
        up = NucleusWsUplink(cfg, "app", session, "m")
        assert await up.send(up.prepare([row(1, {"id": 1}), row(2, {"id": 2})])) == Acked((1, 2))
        late = await up.send(up.prepare([row(3, {"id": 3}), row(4, {"id": 4})]))
        assert isinstance(late, Retry), late
        assert (late.omitted, late.too_slow) == ((), True), late
        await up.close()
    await fake.stop()


class _LateAcker:
    """A websocket upstream on 127.0.0.1, port 0: its first connection never acknowledges
    the frame it gets and holds its answer to the agent's close frame until ``release``
    (``closing`` is set when that close frame comes); later connections acknowledge
    every frame."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.release = asyncio.Event()
        self.connections = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        self.connections += 1
        first = self.connections == 1
        ws = web.WebSocketResponse(autoclose=False)
        await ws.prepare(request)
        while True:   # not ``async for``: it ends at the close frame, unseen
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT and not first:
                ids = [ev["id"] for ev in orjson.loads(msg.data)["data"]]
                await ws.send_str(orjson.dumps({"reportedIds": ids}).decode())
            elif msg.type is WSMsgType.CLOSE:
                self.closing.set()
                await self.release.wait()
                await ws.close()
            elif msg.type is not WSMsgType.TEXT:
                return ws

    async def __aenter__(self) -> _LateAcker:
        app = web.Application()
        app.router.add_get("/app/{key}/track", self._ws)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"ws://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()


async def test_ws_a_failed_frame_s_ids_stay_in_flight_until_its_connection_is_closed() -> None:
    """A frame whose acks did not come in time fails, but its connection is open until its
    close completes, and an ack for the frame that had just arrived is still read. An event
    prepared meanwhile with one of the frame's ids (the app's ids: another session may reuse
    one) must not go in a batch, or that ack is taken for it, and the agent deletes an
    event it never sent. Seen end to end against an upstream that acknowledged around the
    timeout (a batch prepared in that window came back Acked, unsent); here the window is
    held open by the upstream's late answer to the close. The ids were freed as the frame
    failed."""
    async with asyncio.timeout(15), _LateAcker() as fake, aiohttp.ClientSession() as session:
        cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=fake.url, timeout_s=1)
        up = NucleusWsUplink(cfg, "app", session, "m")
        failing = asyncio.create_task(up.send(up.prepare([row(1, {"id": 7})])))
        await fake.closing.wait()   # it timed out: its connection is closing
        assert not failing.done()
        meanwhile = up.prepare([row(2, {"id": 7, "sessionId": 2})])
        assert meanwhile.rows == (), "an id the closing connection may still acknowledge"
        fake.release.set()
        result = await failing
        assert isinstance(result, Retry) and result.acked == ()
        await up.close()   # as the forwarder does, with nothing in flight: ids start afresh
        assert await up.send(up.prepare([row(2, {"id": 7, "sessionId": 2})])) == Acked((2,))
        assert fake.connections == 2
        await up.close()
