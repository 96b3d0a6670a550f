"""An upstream that flaps as it comes back: the probe connects, the key's send right after
fails, then the upstream is back for good. Delivery must still resume within probe
intervals, not after the key's backoff (at its cap, 30 to 60 s).

Found by tests/test_resume_process.py stalling 10 s once under a loaded full suite: a
send that fails less than a probe interval after a probe connected was taken for a live
upstream answering badly, so nothing probed again and the key waited out its backoff
even though the upstream was unreachable.

In process, on a manual forwarder clock (tests/fakes/manual_timing.py): no forwarder
time passes unless the test advances it, so a delivery after two probe intervals can
only have come from the probes, not from the key's own retry 30 s or more away.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent.forwarder.backoff import Backoff
from agent.forwarder.probe import PROBE_S
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_resume import down_nucleus, nucleus_upstream, quiet, seams
from tests.test_upstream_faults import event, send
from tests.waiting import wait_for

__all__ = ["down_nucleus"]   # the fixture, shared with tests/test_resume.py


class Flap:
    """The upstream's port for a moment: it takes the probe's connection, then dies while
    the key's websocket handshake waits for its answer: that connection is reset, and
    aiohttp's one retry of the GET is refused."""

    def __init__(self) -> None:
        self.handshake = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._held: list[asyncio.StreamWriter] = []

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", port,
                                                  reuse_address=True)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.read(1):   # the probe sends nothing and closes; a handshake writes
            self._held.append(writer)
            self.handshake.set()
        else:
            writer.close()

    async def die(self) -> None:
        assert self._server is not None
        self._server.close()   # nothing listens from here on: a connect is refused
        for writer in self._held:
            writer.transport.abort()
        await self._server.wait_closed()


def settled(agent: Any) -> bool:
    """No key's loop runs and no probe is in flight: only timers wait."""
    return not agent.forwarding.loops and not any(
        p.probing for p in agent.forwarding.probers.values())


async def test_a_send_that_fails_right_after_the_probe_found_the_upstream_back_is_probed(
        make_agent: Any, down_nucleus: FakeNucleus) -> None:
    timing = ManualTiming()
    # One failure takes the key's backoff to its cap: each wait is 30 to 60 s.
    agent = await make_agent(upstreams=[nucleus_upstream(down_nucleus, "nucleus-ws")],
                             seams=seams(timing, Backoff(base_s=60.0)))
    state = agent.forwarding.states["up"]
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: state.retries == 1 and state.unreachable_since is not None)
    await quiet(agent, timing, 2)   # the key's retry and the next probe

    flap = Flap()
    await flap.start(down_nucleus.port)
    timing.advance(PROBE_S)   # the probe connects: the key is retried at once...
    await flap.handshake.wait()
    await flap.die()          # ...and fails: the upstream is gone again
    await wait_for(lambda: state.retries == 2 and settled(agent))
    assert max(timing.pending()) >= 30.0   # the key's own retry: at its cap

    timing.advance(PROBE_S)   # still down: found unreachable, and probed every PROBE_S
    await wait_for(lambda: settled(agent))
    assert state.probes == 3 and state.unreachable_since is not None
    await down_nucleus.come_back()
    timing.advance(PROBE_S)   # the next probe connects and the key is sent at once
    await wait_for(lambda: agent.spool.depth == 0)
    assert down_nucleus.ids() == list(range(5))
    assert timing.now() == 3 * PROBE_S   # the key's own retry was 30 s or more away

