"""A websocket upstream that misbehaves after its handshake, or refuses the handshake.

The agent runs in process against real upstreams on 127.0.0.1: a deaf one
(tests/fakes/deaf_upstream.py) that takes the handshake and then reads nothing, and
the scripted tests/fakes/faulty_upstream.py.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from agent.forwarder.supervisor import Seams
from tests.fakes.deaf_upstream import DeafUpstream
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_upstream_faults import event, send
from tests.waiting import wait_for


async def status(agent: Any) -> dict[str, Any]:
    """The one upstream's entry in GET /status."""
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        assert r.status == 200
        (up,) = (await r.json())["upstreams"]
        return dict(up)


async def test_an_upstream_that_stops_reading_fails_the_send_and_is_retried(
        make_agent: Any, fast_backoff: Seams, fake_nucleus: FakeNucleus) -> None:
    """It takes the handshake, then reads nothing: the agent's frames fill the TCP window
    and its own buffers, and a send waits for room. Before the fix that send waited
    forever, and with it the key: `/status` said `sending`, with no error and no retry."""
    deaf = await DeafUpstream(fake_nucleus.port).start()
    try:
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": "nucleus-ws", "url": deaf.ws_url,
            "flush_interval_s": 0.02, "timeout_s": 0.5, "max_in_flight": 16}])
        # 5.6 MB in up to 16 frames of 500 KB in flight: more than the path between them
        # holds (on loopback the agent's socket takes up to 4 MB, tcp_wmem).
        pad = "x" * 8000
        for p in range(7):
            await send(agent, [event(p * 100 + i, pad=pad) for i in range(100)])
        last: dict[str, Any] = {}

        async def failed_and_retried() -> bool:
            last.update(await status(agent))
            return last["retries"] >= 1 and "stopped reading" in (last["last_error"] or "")
        try:
            await wait_for(failed_and_retried, 4)
        except AssertionError:
            raise AssertionError(f"no failure shown: {last}") from None
        assert deaf.deaf_connections >= 1
        deaf.deaf = False   # the next connection reaches a good upstream
        await wait_for(lambda: agent.spool.depth == 0, 5)
        assert set(fake_nucleus.ids()) == set(range(700))
        assert await agent.spool.dead_letters() == []
    finally:
        await deaf.stop()
