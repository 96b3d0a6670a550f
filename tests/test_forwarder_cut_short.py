"""A loop that ends with a send cut short (its grace ran out) closes its uplink whatever the
cut raises: the websocket of a crashed loop, left open, lived on beside its successor's."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.forwarder.supervisor import Seams
from tests.conftest import FAST_BACKOFF
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.test_upstream_faults import drained, event, send, upstream
from tests.waiting import wait_for


async def test_a_crashed_loop_closes_its_websocket_when_cutting_a_send_raises(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """The live view's ack hook raises (a bug): at the first frame's ack, which crashes the
    loop, and again as the crashed loop cuts the second frame short (half of it
    acknowledged, the rest never). Before the fix that second raise skipped the uplink's
    close: the crashed loop's websocket stayed open, heartbeating, beside its successor's."""
    agent = await make_agent(
        upstreams=[upstream(faulty, "nucleus-ws", name="hooked", timeout_s=30,
                            batch_max_events=2, max_in_flight=2)],
        seams=Seams(backoff=FAST_BACKOFF, grace_s=0.2))
    told: list[int] = []

    def hook(upstream: str, key: str, rows: Any, seqs: Any) -> None:
        told.extend(seqs)
        if len(told) <= 3:   # the first frame's two acks, and the second's first half
            raise RuntimeError("injected fault in the ack hook")

    agent.forwarding.on_acked = hook
    # Two frames of two events: the first answered whole once both are out (its answer,
    # and the crash, before the second went would leave nothing to cut), the second half.
    both_out = asyncio.Event()
    faulty.script = [Fault("slow", until=both_out), Fault("partial")]
    await send(agent, [event(i) for i in range(4)])
    state = agent.forwarding.states["hooked"]
    await wait_for(lambda: state.sent >= 4, 5)   # counted as each send starts its frame
    both_out.set()
    await drained(agent, faulty, 4)
    assert len(told) >= 3 and state.crashes >= 1
    assert faulty.connections == 2   # the crashed loop's, and its successor's
    # Each closed once its loop ended (the successor's once its queue stayed empty for
    # flush_interval_s): before the fix the crashed loop's never was.
    await wait_for(lambda: all(ws.closed for ws in faulty._sockets), 5)
