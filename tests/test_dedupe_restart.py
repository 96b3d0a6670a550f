"""Dedupe across a restart of the agent: under dedupe_max_keys, every event received
within dedupe_window_h is known again once the index is rebuilt from the spool."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from tests.test_dead_letters import RefusingNucleus
from tests.test_dropped_resend import event, post
from tests.waiting import wait_for


class RefuseThenWait(RefusingNucleus):
    """Refuses ``refuse_next`` requests for good (400), then answers 503 (try again later)
    while ``waiting``; else acknowledges as FakeNucleus does."""

    def __init__(self) -> None:
        super().__init__(refuse=None)
        self.refuse_next = 0
        self.waiting = False

    async def _http(self, request: web.Request) -> web.Response:
        if self.refuse_next:
            self.refuse_next -= 1
            return web.json_response({"error": "bad event"}, status=400)
        if self.waiting:
            return web.json_response({"error": "busy"}, status=503)
        return await super()._http(request)


async def test_a_delivered_event_is_known_after_a_restart_beside_letters_retried_from_a_queued_record(
        make_agent: Any) -> None:
    """Event 0 is delivered. A request of five events follows: the upstream refuses the
    first four for good (dead letters) and asks the agent to wait with the fifth, which
    stays queued in their record. The operator retries the letters: their keys move to
    the retried record, their places in the queued one hold a placeholder. Six keys,
    under a dedupe_max_keys of 7, all within the window: after a restart, the app's
    resend of event 0 is a duplicate, as before it. The rebuild counted the placeholders
    as keys against the cap, read no further back than that, and left event 0's key
    out: the resend was stored and delivered a second time, and dedupe_forgotten said 0."""
    up = RefuseThenWait()
    await up.start()
    try:
        upstreams = [{"name": "up", "protocol": "nucleus-http", "url": up.http_url,
                      "flush_interval_s": 0.02, "timeout_s": 2, "batch_max_events": 1}]
        storage = {"dedupe_max_keys": 7}
        agent = await make_agent(upstreams=upstreams, storage=storage)
        async with aiohttp.ClientSession() as s:
            await post(s, agent.port, [event(0)])
            await wait_for(lambda: up.ids() == [0] and agent.spool.depth == 0)
            up.refuse_next, up.waiting = 4, True
            await post(s, agent.port, [event(i) for i in range(1, 6)])   # one record
            await wait_for(lambda: agent.spool.dead_count == 4)
            async with s.post(f"http://127.0.0.1:{agent.port}/dead/retry",
                              json={"all": True}) as r:
                assert r.status == 200 and (await r.json())["retried"] == 4
            await post(s, agent.port, [event(0)])
            assert agent.spool.counters.get("duplicates", 0) == 1
            await agent.stop()
            agent = await make_agent(upstreams=upstreams, storage=storage)
            await post(s, agent.port, [event(0)])   # within the window, under the cap
            up.waiting = False
            agent.forwarding.flush()
            await wait_for(lambda: agent.spool.depth == 0)
        assert sorted(up.ids()) == [0, 1, 2, 3, 4, 5], up.ids()
        assert agent.spool.counters.get("duplicates", 0) == 2
        assert agent.spool.counters.get("dedupe_forgotten", 0) == 0
    finally:
        await up.stop()
