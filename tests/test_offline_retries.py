"""What the forwarders send to an upstream, and what its retries cost.

``sent`` (/status, ``outpost_upstream_sent_total``) counts the events in the batches
the forwarders sent or tried, a resend counting again. A nucleus-ws key whose upstream
does not listen must not prepare its batch (Segment events: each mapped to Nucleus) on
every retry only to find that the connect fails: on a device offline for a week, that
is battery spent for nothing. The websocket is opened first; a batch is prepared only
on a connection.

The agents run on a manual forwarder clock (tests/fakes/manual_timing.py): each retry
comes when the test advances to it, none by waiting real seconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent.forwarder.backoff import Backoff
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.segment_helpers import basic, call
from tests.test_resume import get_json, nucleus_upstream, quiet, seams
from tests.test_upstream_faults import delivered, event, send, upstream
from tests.waiting import wait_for

RETRIES = 4


async def test_sent_counts_every_event_sent_and_each_resend_again(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    faulty.script = [Fault("status", 503)]   # the first batch fails; its resend is acked
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")])
    await send(agent, [event(i) for i in range(3)])
    await wait_for(lambda: agent.spool.depth == 0 and set(delivered(faulty)) == {0, 1, 2})
    status = (await get_json(agent, "/status"))["upstreams"][0]
    assert (status["sent"], status["acked"], status["retries"]) == (6, 3, 1)
    assert 'outpost_upstream_sent_total{upstream="up"} 6' in await get_json(agent, "/metrics")


async def test_a_websocket_upstream_that_does_not_listen_costs_its_retries_no_batch(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    await fake_nucleus.go_down()   # its port refuses connections until it comes back
    timing = ManualTiming()
    agent = await make_agent(upstreams=[nucleus_upstream(fake_nucleus, "nucleus-ws")],
                             seams=seams(timing, Backoff(base_s=8.0)))
    state = agent.forwarding.states["up"]
    batch = {"batch": [{"type": "track", "event": f"e{i}", "userId": "u", "messageId": f"m{i}"}
                       for i in range(5)]}
    reply = await call(agent.port, "/v1/batch", batch, headers={"Authorization": basic("k")})
    assert reply.status == 200
    await wait_for(lambda: state.retries == 1)
    for n in range(2, RETRIES + 1):
        await quiet(agent, timing, 2)   # the key's retry and the prober's next probe
        timing.advance(timing.pending()[-1])   # the key's retry (4 s or more; probes: 2 s)
        await wait_for(lambda: state.retries == n)  # noqa: B023 - awaited in this iteration
    await quiet(agent, timing, 2)
    status = (await get_json(agent, "/status"))["upstreams"][0]
    assert status["retries"] == RETRIES
    assert status["last_error"].startswith("connect failed"), status["last_error"]
    assert status["queue_depth"] == 5
    assert status["sent"] == 0   # no retry prepared a batch it could not send

    await fake_nucleus.come_back()
    timing.advance(min(timing.pending()))   # the next probe connects: the key is retried
    await wait_for(lambda: agent.spool.depth == 0)
    assert [ev["name"] for ev in fake_nucleus.events] == [f"e{i}" for i in range(5)]
    assert state.sent == 5   # prepared and sent once, on the connection
    # The connection opened before the batch was prepared: that is traffic, not an idle
    # minute, so no heartbeat went out ahead of the events.
    assert fake_nucleus.heartbeats == [] and fake_nucleus.frames == 1


async def test_a_stop_during_a_handshake_that_hangs_is_not_held_for_timeout_s(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """The connect now happens in the loop's own step, not in a delivery task that a stop
    cancels after its grace: a stop (a shutdown, a hold) must still end it."""
    faulty.connect_script = [Fault("timeout", delay=45.0)]   # longer than the bound below
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws", timeout_s=40)])
    await send(agent, [event(0)])
    await wait_for(lambda: any(r.fault == "connect-timeout" for r in faulty.requests))
    await asyncio.wait_for(agent.stop(), 15)   # the grace for batches in flight is 5 s
    assert agent.spool.depth == 1   # nothing went out; the event waits in the spool


async def test_an_upstream_that_closes_each_websocket_at_once_costs_one_handshake_a_retry(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A connection the upstream closes before its first frame is not an idle drop to
    replace at once: the retry fails on it, and the next waits out its backoff."""
    faulty.connect_script = [Fault("close")] * (4 * RETRIES)   # more than any count below
    timing = ManualTiming()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws")],
                             seams=seams(timing, Backoff(base_s=8.0)))
    state = agent.forwarding.states["up"]
    await send(agent, [event(i) for i in range(3)])
    await wait_for(lambda: state.retries == 1)
    for n in range(2, RETRIES + 1):
        await quiet(agent, timing, 1)   # the key's retry (the upstream answered: no probe waits)
        timing.advance(timing.pending()[0])
        await wait_for(lambda: state.retries == n)  # noqa: B023 - awaited in this iteration
    await quiet(agent, timing, 1)
    handshakes = [r for r in faulty.requests if r.fault == "connect-close"]
    assert len(handshakes) == RETRIES, [r.fault for r in faulty.requests]
    assert agent.spool.depth == 3
    assert state.last_error.startswith("the upstream closed the connection right after the "
                                       "handshake (close code 1000)"), state.last_error
