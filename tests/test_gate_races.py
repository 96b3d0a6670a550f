"""The transmit-profile gate (Supervisor.regate) against the parked keys: a key is parked
or has one loop, never both, however the gate flips while a loop settles its batches."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import orjson

from agent.families.event import NUCLEUS
from agent.families.lanes import LANES
from agent.settings import UpstreamConfig
from agent.spool.types import Row
from agent.uplinks.base import Acked, Retry, SendResult, UplinkBase
from agent.uplinks.prepare import Prepared
from tests.fakes.manual_timing import ManualTiming
from tests.test_resume import seams
from tests.test_upstream_faults import event, send
from tests.waiting import wait_for


class Scripted:
    """An upstream that refuses the first batch with a Retry-After and holds every later
    one until ``release`` is set; it records how many times each seq is in flight."""

    def __init__(self) -> None:
        self.sends: list[tuple[int, ...]] = []
        self.in_flight: dict[int, int] = {}
        self.most_at_once = 0
        self.release = asyncio.Event()

    def uplink(self, up: UpstreamConfig, key: str, session: Any, machine: str) -> UplinkBase:
        script = self

        class Uplink(UplinkBase):
            protocol: ClassVar[str] = "nucleus-ws"
            schemes: ClassVar[tuple[str, ...]] = ("ws",)
            family: ClassVar[int] = NUCLEUS

            def encode_stored(self, row: Row) -> tuple[bytes, Any]:
                return bytes(row.body), row.seq

            def encode_mapped(self, ev: dict[str, Any], row: Row) -> tuple[bytes, Any]:
                return orjson.dumps(ev), row.seq

            async def send(self, prepared: Prepared) -> SendResult:
                script.sends.append(prepared.seqs)
                for s in prepared.seqs:
                    script.in_flight[s] = script.in_flight.get(s, 0) + 1
                    script.most_at_once = max(script.most_at_once, script.in_flight[s])
                try:
                    if len(script.sends) == 1:
                        return Retry("refused for now", retry_after=5.0)
                    await script.release.wait()
                    return Acked(prepared.seqs)
                finally:
                    for s in prepared.seqs:
                        script.in_flight[s] -= 1

        return Uplink(up, key, session, machine)


async def test_a_gate_flip_while_a_loop_settles_never_runs_two_loops_for_a_key(
        make_agent: Any) -> None:
    timing = ManualTiming()
    script = Scripted()
    agent = await make_agent(upstreams=[{"name": "up", "protocol": "nucleus-ws",
                                         "url": "ws://127.0.0.1:9/", "batch_max_events": 1,
                                         "flush_interval_s": 0.02, "max_in_flight": 4}],
                             seams=seams(timing, make_uplink=script.uplink))
    sup = agent.forwarding
    await send(agent, [event(i) for i in range(3)])
    # The first batch is refused; the other two are in flight: the loop settles them.
    await wait_for(lambda: len(script.sends) == 3)
    (task,) = sup._tasks
    gate = {"open": False}
    sup.may_send = lambda key: LANES if gate["open"] else ()
    sup.regate()            # a hold: the loop is told to stop, and settles
    gate["open"] = True
    sup.regate()            # let go before the loop has ended
    script.release.set()    # the two batches are acked; the loop parks its key and ends
    await wait_for(lambda: task.done() and task not in sup._tasks)
    live = [loop for loop in sup.loops.values() if not loop.released]
    assert "app1" in sup._lot and not live, "a key parked while a loop runs for it"
    # The Retry-After passes: one loop resends the refused event, and nothing else.
    timing.advance(5.0)
    await wait_for(lambda: agent.spool.depth == 0)
    assert script.most_at_once == 1, "an event was in flight twice at once"
    assert [s for s in script.sends if 1 in s] == [(1,), (1,)]
