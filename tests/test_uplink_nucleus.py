"""Nucleus uplinks against the fake server: frames, id uniqueness, heartbeats, drops."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from agent.families.event import NUCLEUS, SEGMENT
from agent.settings import UpstreamConfig
from agent.spool.types import Row
from agent.uplinks.nucleus_frame import FrameBuilder
from agent.uplinks.nucleus_ws import NucleusWsUplink
from tests.fakes.nucleus_upstream import FakeNucleus


def row(seq: int, body: dict[str, Any] | bytes, family: int = NUCLEUS) -> Row:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Row(seq, 1, family, 1_767_323_045_000, raw)


def test_frame_builder_splices_bodies_and_keeps_ids_unique() -> None:
    fb = FrameBuilder(max_events=10, max_bytes=10_000)
    rows = [row(1, {"id": 7, "name": "a"}), row(2, {"name": "no id"}), row(3, {"id": 7})]
    taken = fb.take(rows)
    assert [r.seq for r in taken] == [1, 2]          # id 7 is in flight: stop before it
    frame = orjson.loads(fb.frame(taken))
    assert frame == {"data": [{"id": 7, "name": "a"}, {"name": "no id", "id": 2}]}
    assert fb.take(rows[2:]) == []
    assert fb.match([7, 999, {"x": 1}]) == [1]       # unknown and odd ids are ignored
    assert [r.seq for r in fb.take(rows[2:])] == [3]


def test_frame_builder_respects_byte_cap_and_flags_corrupt_rows() -> None:
    fb = FrameBuilder(max_events=100, max_bytes=1024)
    rows = [row(i, {"id": i, "pad": "x" * 300}) for i in range(1, 6)]
    assert len(fb.take(rows)) == 3
    fb2 = FrameBuilder(max_events=100, max_bytes=10_000)
    taken = fb2.take([row(1, b"\xff\x00garbage"), row(2, {"id": 2})])
    assert [r.seq for r in taken] == [1, 2]
    assert "corrupt row" in fb2.pop_corrupt(taken)[1]
    assert orjson.loads(fb2.frame(taken)) == {"data": [{"id": 2}]}


def test_segment_rows_are_mapped_with_seq_ids() -> None:
    fb = FrameBuilder(max_events=10, max_bytes=10_000)
    seg = row(5, {"type": "track", "event": "Bought", "userId": "u", "messageId": "m1",
                  "properties": {"p": 1}}, family=SEGMENT)
    (ev,) = orjson.loads(fb.frame(fb.take([seg])))["data"]
    assert ev["id"] == 5 and ev["type"] == "event" and ev["name"] == "Bought"
    assert ev["payload"]["p"] == 1


async def test_ws_uplink_heartbeats_when_idle_and_recovers_from_a_drop() -> None:
    fake = await FakeNucleus().start()
    cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=fake.url, timeout_s=2)
    async with aiohttp.ClientSession() as session:
        up = NucleusWsUplink(cfg, "app", session, "machine-1", heartbeat_s=0.2)
        batch = up.take([row(1, {"id": 1}), row(2, {"id": 2})])
        result = await up.send(batch)
        assert result.acked == [1, 2] and result.error is None
        await asyncio.sleep(0.7)
        assert fake.heartbeats and fake.heartbeats[0] == {"type": "heartbeat",
                                                          "machineId": "machine-1"}
        fake.drop_after_frames = fake.frames + 1     # the next frame kills the connection
        lost = await up.send(up.take([row(3, {"id": 3})]))
        assert lost.acked == [] and lost.error is not None
        fake.drop_after_frames = None
        # Until the forwarder has settled and closed, nothing opens a new connection:
        # a later batch must not overtake the one that failed (FIFO).
        early = await up.send(up.take([row(4, {"id": 4})]))
        assert early.error is not None and fake.connections == 1
        await up.close()
        again = await up.send(up.take([row(3, {"id": 3})]))   # same id, new connection
        assert again.acked == [3] and fake.connections == 2
        await up.close()
    await fake.stop()


async def test_ws_uplink_times_out_on_missing_acks_and_ignores_junk() -> None:
    fake = await FakeNucleus().start()
    fake.reply_raw = b'{"reportedIds": "nope"} trailing'
    cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=fake.url, timeout_s=0.3)
    async with aiohttp.ClientSession() as session:
        up = NucleusWsUplink(cfg, "app", session, "m")
        result = await up.send(up.take([row(1, {"id": 1})]))
        assert result.acked == [] and "no reportedIds" in (result.error or "")
        fake.reply_raw = None
        await up.close()   # as the forwarder does after a failure, before sending again
        assert (await up.send(up.take([row(1, {"id": 1})]))).acked == [1]
        await up.close()
    await fake.stop()
