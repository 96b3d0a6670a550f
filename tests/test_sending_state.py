"""An upstream's state as /status (so `outpost status`, the page and /metrics) shows it
while its keys' events go out: `sending`, not `idle`, for as long as a key has a batch in
flight or a batch due to go, whichever key's batch was answered last."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from agent.families.lanes import LANES
from agent.forwarder.backoff import Backoff
from agent.forwarder.state import UpstreamState
from agent.forwarder.supervisor import Seams
from agent.uplinks.base import SendResult, Uplink
from agent.uplinks.nucleus_http import NucleusHttpUplink
from agent.uplinks.nucleus_ws import NucleusWsUplink
from agent.uplinks.prepare import Prepared
from agent.uplinks.registry import make_uplink
from tests.fakes.faulty_upstream import FaultyUpstream
from tests.fakes.loopback_server import serving
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call
from tests.test_upstream_faults import delivered, drained, event, send, upstream
from tests.waiting import wait_for


async def upstream_state(port: int) -> tuple[str, int, int]:
    """The upstream's state, its queue and its acks, as one /status shows them."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/status") as r:
        [up] = (await r.json())["upstreams"]
    return up["state"], up["queue_depth"], up["acked"]


async def test_an_upstream_answering_one_key_is_sending_while_another_key_s_batch_is_in_flight(
        make_agent: Any) -> None:
    """Each key's loop set the upstream's shared state as it went: key A's batch answered
    said `idle` while key B's batch was still in flight."""
    gate = asyncio.Event()

    async def collector(request: web.Request) -> web.Response:
        key = base64.b64decode(request.headers["Authorization"][6:]).decode()
        if key.startswith("key-b"):
            await gate.wait()
        return web.json_response({"success": True})

    async with serving("/v1/batch", collector) as url:
        agent = await make_agent(upstreams=[{"name": "seg", "protocol": "segment-http",
                                             "url": url, "flush_interval_s": 0.02}])
        state = agent.forwarding.states["seg"]
        for key in ("key-b", "key-a"):
            r = await call(agent.port, "/v1/batch", {"batch": [
                {"type": "track", "event": "e", "userId": "u", "messageId": key}]},
                headers={"Authorization": basic(key)})
            assert r.status == 200, r.body
            if key == "key-b":   # its batch sent, and held by the collector
                await wait_for(lambda: state.sent == 1)
        # Key A's, answered and deleted from the spool (a commit of its own, after the ack).
        await wait_for(lambda: state.acked == 1 and agent.spool.depth == 1)
        assert await upstream_state(agent.port) == ("sending", 1, 1)
        gate.set()

        async def drained() -> bool:
            return await upstream_state(agent.port) == ("idle", 0, 2)
        await wait_for(drained)


async def test_an_upstream_draining_a_backlog_shows_sending_until_it_is_drained(
        make_agent: Any) -> None:
    """`sending` covered a request in flight only: between one batch's answer and the next
    batch's request (the spool read, the batch built) status said `idle`, most of the time
    while a backlog drained (a fast upstream answers sooner than a batch is built). Every
    /status taken while more than the last batches are queued says `sending`."""
    fake = await FakeSegment().start()
    try:
        fake.outage = (503, None)
        agent = await make_agent(upstreams=[{
            "name": "seg", "protocol": "segment-http", "url": fake.url,
            "flush_interval_s": 0.05, "batch_max_events": 100}])
        for i in range(0, 20_000, 2_000):
            await send(agent, [event(n) for n in range(i, i + 2_000)])
        await wait_for(lambda: agent.forwarding.states["seg"].retries > 0)
        fake.outage = None
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{agent.port}/flush") as r:
            assert r.status == 200, await r.text()
        draining = []
        async with asyncio.timeout(60):
            while (seen := await upstream_state(agent.port))[1]:
                state, queued, acked = seen
                # Past its first answer (before it, the backoff ends), and before its last
                # batches, whose acks may still be committing.
                if acked and queued >= 25 * 100:
                    draining.append(state)
        assert len(draining) >= 5, draining
        assert set(draining) == {"sending"}, draining
    finally:
        await fake.stop()


class _CrashingSend(NucleusHttpUplink):
    """INJECTED FAULT (factory level): the send raises, as a bug on the delivery path."""

    async def send(self, prepared: Prepared) -> SendResult:
        raise ValueError("injected crash in send")


def after_this_step(read: Callable[[], None]) -> None:
    """Run ``read`` once the task running now has gone as far as it goes without waiting:
    what a /status request served then would see."""
    asyncio.get_running_loop().call_soon(read)


async def test_a_loop_restarted_after_a_crash_shows_sending_until_its_first_read(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A loop that crashed (a bug) waits out its restart backoff, "restarting", and starts
    again with its events queued and due. The restart set the upstream "idle" before its
    first read: status showed it idle, with nothing held and no backoff, for as long as
    that read took."""
    timing = ManualTiming()
    seen: list[tuple[str, int]] = []
    built: list[str] = []

    def factory(cfg: Any, key: str, session: aiohttp.ClientSession, machine_id: str) -> Uplink:
        built.append(key)
        if len(built) == 1:
            return _CrashingSend(cfg, key, session, machine_id)
        after_this_step(lambda: seen.append((state.shown, agent.spool.depth)))
        return make_uplink(cfg, key, session, machine_id)

    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", name="crashy-idle")],
                             seams=Seams(make_uplink=factory, timing=timing,
                                         backoff=Backoff(base_s=8.0)))
    state = agent.forwarding.states["crashy-idle"]
    await send(agent, [event(i) for i in range(3)])
    await wait_for(lambda: state.state == "restarting" and bool(timing.pending()))
    timing.advance(timing.pending()[0])   # the restart is due: the loop runs again
    await wait_for(lambda: bool(seen))
    assert seen == [("sending", 3)], seen
    await drained(agent, faulty, 3)


async def test_a_key_whose_frames_are_halved_after_a_1009_shows_sending_through_the_handover(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A websocket closed with 1009 (a frame too big): the key's loop ends at once and a
    new one sends half the bytes (no backoff). The ending loop stopped counting itself
    sending before it closed its uplink, and its successor counted only once it had read:
    status showed the upstream "idle" at each halving, with the refused events queued and
    due. Read as each loop closes its uplink, and as each successor is built."""
    faulty.max_frame = 30_000   # three of these 8 KB events, not four
    seen: list[tuple[str, str, int]] = []
    states: dict[str, UpstreamState] = {}

    def read(when: str) -> None:
        seen.append((when, states["up"].shown, agent.spool.depth))

    class Watched(NucleusWsUplink):
        async def close(self) -> None:
            read("closing")
            await super().close()

    def factory(cfg: Any, key: str, session: aiohttp.ClientSession, machine_id: str) -> Uplink:
        if seen:   # a successor: read before its first step
            after_this_step(lambda: read("built"))
        return Watched(cfg, key, session, machine_id)

    timing = ManualTiming()   # it never moves: a backoff would hold the key for good
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws", batch_max_events=100)],
                             seams=Seams(make_uplink=factory, timing=timing))
    states["up"] = agent.forwarding.states["up"]
    await send(agent, [event(i, pad="x" * 8000) for i in range(20)])
    await drained(agent, faulty, 20)
    assert states["up"].frame_limit_bytes is not None and states["up"].retries == 0
    assert any(when == "built" for when, _, _ in seen), seen
    assert [s for s in seen if s[2]] == [(when, "sending", n) for when, _, n in seen if n], seen



async def test_a_key_giving_its_turn_to_a_key_in_line_shows_sending_through_the_handover(
        make_agent: Any) -> None:
    """At most max_loops loops run per upstream; a key whose queue never empties gives its
    turn to a key in line. The loop giving its turn stopped counting itself sending
    before it closed its uplink, and the next key's loop counted only once it had read:
    status showed the upstream "idle" at each handover, with both keys' events due. Read
    as each loop with events still queued closes its uplink, and as each loop is built
    for a key whose turn came."""
    gate = asyncio.Event()
    seen: list[tuple[str, str, str, int]] = []

    async def collector(request: web.Request) -> web.Response:
        await gate.wait()
        return web.json_response({"success": True})

    def read(when: str, key: str) -> None:
        stream = agent.spool.streams.get(key)
        seen.append((when, key, agent.forwarding.states["seg"].shown,
                     stream.depth if stream is not None else 0))

    def factory(cfg: Any, key: str, session: aiohttp.ClientSession, machine_id: str) -> Uplink:
        if seen or agent.forwarding.loops:   # a turn come: read before its first step
            after_this_step(lambda: read("built", key))
        uplink = make_uplink(cfg, key, session, machine_id)
        close = uplink.close

        async def watched() -> None:
            read("closing", key)
            await close()
        uplink.close = watched  # type: ignore[method-assign]
        return uplink

    async with serving("/v1/batch", collector) as url:
        agent = await make_agent(seams=Seams(make_uplink=factory, max_loops=1),
                                 upstreams=[{"name": "seg", "protocol": "segment-http",
                                             "url": url, "flush_interval_s": 0.001,
                                             "batch_max_events": 1}])
        state = agent.forwarding.states["seg"]
        for key, n in (("key-a", 3), ("key-b", 1)):
            r = await call(agent.port, "/v1/batch", {"batch": [
                {"type": "track", "event": "e", "userId": "u", "messageId": f"{key}-{i}"}
                for i in range(n)]}, headers={"Authorization": basic(key)})
            assert r.status == 200, r.body
            if key == "key-a":   # its first batch sent, held by the collector
                await wait_for(lambda: state.sent == 1)
        gate.set()
        await wait_for(lambda: agent.spool.depth == 0 and state.acked == 4)
    handed = [s for s in seen if s[0] == "built" or s[3]]
    assert any(when == "built" for when, *_ in handed), seen
    assert [s[2] for s in handed] == ["sending"] * len(handed), seen


async def test_a_key_waiting_in_line_for_a_loop_with_a_batch_due_shows_sending(
        make_agent: Any) -> None:
    """Every loop of the upstream busy (max_loops; here one, key A's, waiting for its
    batch to fill), key B with a whole batch queued waits in line for a loop: status
    showed the upstream "idle", though a batch is due to go, until A's loop gave its
    turn (two flush intervals on)."""
    async def collector(request: web.Request) -> web.Response:
        return web.json_response({"success": True})

    async with serving("/v1/batch", collector) as url:
        agent = await make_agent(seams=Seams(max_loops=1),
                                 upstreams=[{"name": "seg", "protocol": "segment-http",
                                             "url": url, "flush_interval_s": 30,
                                             "batch_max_events": 2}])
        for key, n in (("key-a", 1), ("key-b", 2)):
            r = await call(agent.port, "/v1/batch", {"batch": [
                {"type": "track", "event": "e", "userId": "u", "messageId": f"{key}-{i}"}
                for i in range(n)]}, headers={"Authorization": basic(key)})
            assert r.status == 200, r.body
        await wait_for(lambda: "key-b" in agent.forwarding._line.get("seg", {}))
        assert list(agent.forwarding.loops) == ["key-a"]
        assert await upstream_state(agent.port) == ("sending", 3, 0)


async def test_a_flush_as_a_crashed_loop_gives_up_its_restart_starts_the_key_afresh(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A loop crashed and the uplink for its restart could not be built: its key is
    parked for a retry and the loop ends. A flush (`outpost flush`) in the moment
    between the loop's end and the supervisor hearing of it took the key out of the
    lot and resumed that ended loop: the key had no loop and no retry, its events stayed
    queued until the app sent more, and its upstream showed "sending" for good."""
    timing = ManualTiming()
    built: list[str] = []

    def factory(cfg: Any, key: str, session: aiohttp.ClientSession, machine_id: str) -> Uplink:
        built.append(key)
        if len(built) == 1:
            return _CrashingSend(cfg, key, session, machine_id)
        if len(built) == 2:
            after_this_step(agent.forwarding.flush)   # what /flush served then does
            raise OSError("injected fault building the restart's uplink")
        return make_uplink(cfg, key, session, machine_id)

    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", name="crashy-flush")],
                             seams=Seams(make_uplink=factory, timing=timing,
                                         backoff=Backoff(base_s=8.0)))
    state = agent.forwarding.states["crashy-flush"]
    await send(agent, [event(i) for i in range(3)])
    await wait_for(lambda: state.state == "restarting" and bool(timing.pending()))
    timing.advance(timing.pending()[0])   # the restart is due; its uplink fails
    await wait_for(lambda: len(built) == 3 or not agent.forwarding.loops)
    assert len(built) == 3, (built, state.shown, agent.spool.depth)
    await drained(agent, faulty, 3)
    assert delivered(faulty) == {0: 1, 1: 1, 2: 1}
    await wait_for(lambda: state.shown == "idle")


async def test_a_key_held_while_its_crashed_loop_waits_to_restart_is_not_shown_restarting(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A loop crashed (a bug) and waits out its restart backoff; meanwhile a transmit
    profile holds its key, so the loop ends instead of restarting. Its upstream still
    showed "restarting", for good: nothing restarted, and the held events wait for the
    profile, not for a restart."""
    timing = ManualTiming()
    built: list[str] = []

    def factory(cfg: Any, key: str, session: aiohttp.ClientSession, machine_id: str) -> Uplink:
        built.append(key)
        if len(built) == 1:
            return _CrashingSend(cfg, key, session, machine_id)
        return make_uplink(cfg, key, session, machine_id)

    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", name="crashy-held")],
                             seams=Seams(make_uplink=factory, timing=timing,
                                         backoff=Backoff(base_s=8.0)))
    supervisor = agent.forwarding
    state = supervisor.states["crashy-held"]
    await send(agent, [event(i) for i in range(3)])
    await wait_for(lambda: state.state == "restarting" and bool(timing.pending()))
    supervisor.may_send = lambda key: ()   # what a transmit profile's hold does
    supervisor.regate()
    await wait_for(lambda: not supervisor.loops)
    assert (state.shown, agent.spool.depth, len(built)) == ("idle", 3, 1)
    supervisor.may_send = lambda key: LANES   # the hold ends: the key's events go
    supervisor.regate()
    await drained(agent, faulty, 3)


async def test_a_key_let_go_by_its_transmit_profile_shows_sending_until_its_first_read(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A transmit profile held a key's events (a full batch of them, due at once); the
    profile lets them go (regate, as when the network or the battery changes, or a
    max_hold_h release). Its new loop counted only once it had read: status showed the
    upstream "idle", with a batch due and nothing holding it, for as long as that read
    took."""
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", batch_max_events=2)])
    supervisor = agent.forwarding
    state = supervisor.states["up"]
    supervisor.may_send = lambda key: ()   # what a transmit profile's hold does
    await send(agent, [event(i) for i in range(3)])
    assert not supervisor.loops and agent.spool.depth == 3 and state.shown == "idle"
    seen: list[str] = []
    supervisor.may_send = lambda key: LANES   # the hold ends
    supervisor.regate()
    after_this_step(lambda: seen.append(state.shown))
    await drained(agent, faulty, 3)
    assert seen == ["sending"], seen


async def test_a_key_whose_loop_could_not_be_built_then_held_is_not_shown_restarting(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """Building a key's loop raised (a bug): the key waits for a retry, its upstream shown
    "restarting". A transmit profile holds the key meanwhile, so its retry starts nothing:
    the upstream still showed "restarting", for good, with nothing to restart."""
    timing = ManualTiming()
    built: list[str] = []

    def factory(cfg: Any, key: str, session: aiohttp.ClientSession, machine_id: str) -> Uplink:
        built.append(key)
        if len(built) == 1:
            raise OSError("injected fault building the uplink")
        return make_uplink(cfg, key, session, machine_id)

    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", name="unbuilt-held")],
                             seams=Seams(make_uplink=factory, timing=timing,
                                         backoff=Backoff(base_s=8.0)))
    supervisor = agent.forwarding
    state = supervisor.states["unbuilt-held"]
    await send(agent, [event(i) for i in range(3)])
    assert state.shown == "restarting" and len(timing.pending()) == 1
    supervisor.may_send = lambda key: ()   # what a transmit profile's hold does
    supervisor.regate()
    timing.advance(timing.pending()[0])   # the key's retry: held, it starts nothing
    assert (state.shown, agent.spool.depth, len(built)) == ("idle", 3, 1)
    supervisor.may_send = lambda key: LANES   # the hold ends: the key's events go
    supervisor.regate()
    await drained(agent, faulty, 3)
