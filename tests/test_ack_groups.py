"""Acks held for a grouped spool delete (forwarder/stream.py ACK_GROUP) are never lost to a
resend: a failure after some batches were acknowledged resends only what was not."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.forwarder.stream import ACK_GROUP
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.loopback_server import serving
from tests.test_read_ahead import HeldCollector, post
from tests.test_read_ahead import drained as held_drained
from tests.test_upstream_faults import delivered, drained, event, resent_after, send, upstream
from tests.waiting import wait_for


@pytest.mark.parametrize("protocol,fault", [("segment-http", Fault("status", 500)),
                                            ("nucleus-ws", Fault("close"))])
async def test_held_acks_are_deleted_before_a_resend(make_agent: Any, faulty: FaultyUpstream,
                                                     protocol: str, fault: Fault) -> None:
    # Three 5-event batches acknowledged (their acks held: 40 events are queued), then
    # the fourth fails and everything unacknowledged is sent again.
    faulty.script = [Fault("slow"), Fault("slow"), Fault("slow"), fault]
    agent = await make_agent(upstreams=[upstream(faulty, protocol, batch_max_events=5)])
    await send(agent, [event(i) for i in range(40)])
    await drained(agent, faulty, 40)
    failed = next(r for r in faulty.requests if r.fault == fault.kind)
    assert max(delivered(faulty).values()) == 1  # no acknowledged event was sent again
    assert not set(resent_after(faulty, failed)) & set(range(15))


async def test_held_acks_are_deleted_once_the_queue_reads_empty(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    # Fewer rows than ACK_GROUP batches: the deletes wait only for the queue to read empty.
    agent = await make_agent(upstreams=[upstream(faulty, "segment-http", batch_max_events=5)])
    await send(agent, [event(i) for i in range(12)])
    await wait_for(lambda: agent.spool.depth == 0, 10)
    assert sorted(delivered(faulty)) == list(range(12))


async def test_a_full_group_of_acks_is_deleted_while_the_drain_goes_on(
        make_agent: Any) -> None:
    # segment-http, one batch at a time: ACK_GROUP batches' acks are deleted while later
    # batches are in flight, not only once the queue reads empty.
    up = HeldCollector()
    size = 5
    async with serving("/v1/batch", up.batch) as url:
        agent = await make_agent(upstreams=[{
            "name": "seg", "protocol": "segment-http", "url": url, "flush_interval_s": 3600,
            "timeout_s": 30, "batch_max_events": size}])
        events = (ACK_GROUP + 10) * size
        await post(agent, [{"type": "track", "event": "e", "userId": "u", "messageId": str(i)}
                           for i in range(events)])
        for _ in range(ACK_GROUP + 1):
            _, answer = await up.next()
            answer.set_result(200)
        _, held = await up.next()
        await wait_for(lambda: agent.spool.depth <= events - ACK_GROUP * size, timeout=10)
        held.set_result(200)
        answering = asyncio.create_task(up.answer_all())
        await held_drained(agent, up, answering)
    assert up.stored == [str(i) for i in range(events)]
