"""An agent with something to show: one upstream acking, one refusing, one down.

Shared by the /metrics, /status, `outpost status` and status page tests, so
each checks its figures against the same, non-trivial state.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from agent.service import Agent
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.waiting import wait_for

LIVE, REFUSED, QUEUED = 5, 2, 3   # events sent to each upstream's key


class RefusingUpstream:
    """Answers every batch with ``status``.

    400: the agent isolates each event and dead-letters it.  503 with a long
    Retry-After: the agent backs off once and stays in backoff, so that the
    figures hold still while tests compare them.
    """

    def __init__(self, status: int = 400, retry_after: int | None = None) -> None:
        self.status = status
        self.headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.requests = 0

    async def _refuse(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.json_response({"error": "refused by the test"}, status=self.status,
                                 headers=self.headers)

    async def start(self) -> RefusingUpstream:
        app = web.Application()
        app.add_routes([web.post("/app/{appId}/track", self._refuse)])
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def post_events(port: int, key: str, ids: range) -> None:
    """One request per event, so the latency histogram counts ``len(ids)`` requests."""
    async with aiohttp.ClientSession() as s:
        for i in ids:
            async with s.post(f"http://127.0.0.1:{port}/app/{key}/track", json={"data": [
                    {"type": "event", "name": "e", "id": i, "sessionId": 1,
                     "machineId": "m"}]}) as r:
                assert r.status == 200, await r.text()


async def populate(port: int) -> None:
    await post_events(port, "app-live", range(LIVE))
    await post_events(port, "app-bad", range(REFUSED))
    await post_events(port, "app-down", range(QUEUED))


async def settled(agent: Agent) -> None:
    """Wait until every upstream has done what the scene expects of it."""
    assert agent.spool is not None and agent.forwarding is not None
    spool, states = agent.spool, agent.forwarding.states
    await wait_for(lambda: spool.counters.get("acked", 0) == LIVE
                   and spool.counters.get("dead_lettered", 0) == REFUSED
                   and states["down"].state == "backoff")


class Scene:
    """The three upstreams, started and stopped together."""

    async def __aenter__(self) -> Scene:
        self.live = await FakeNucleus().start()
        self.strict = await RefusingUpstream(400).start()
        self.down = await RefusingUpstream(503, retry_after=3600).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for fake in (self.live, self.strict, self.down):
            await fake.stop()

    def upstreams(self) -> list[dict[str, Any]]:
        common = {"flush_interval_s": 0.05, "timeout_s": 2}
        return [
            {"name": "live", "protocol": "nucleus-ws", "url": self.live.url,
             "keys": ["app-live"], **common},
            {"name": "strict", "protocol": "nucleus-http", "url": self.strict.url,
             "keys": ["app-bad"], **common},
            {"name": "down", "protocol": "nucleus-http", "url": self.down.url, "keys": ["*"],
             **common},
        ]
