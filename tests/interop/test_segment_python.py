"""The real `segment-analytics-python` 2.4.0 pointed at the agent (only `host=` changes).

Every event arrives upstream, at a Segment collector and at a Nucleus server, and a
healthy agent causes no resend. When the SDK gives up waiting for a reply (its
timeout) and resends the batch, the events are still delivered once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import nucleus_up, segment_up, wait_for

analytics = pytest.importorskip("segment.analytics")
pytestmark = pytest.mark.interop

N_TRACKS = 60
N_EVENTS = N_TRACKS + 5


class SdkRun:
    """One SDK client and the errors it reported."""

    def __init__(self, host: str, key: str, **kw: Any) -> None:
        self.errors: list[Any] = []
        self.client = analytics.Client(key, host=host, upload_interval=0.1, upload_size=25,
                                       max_retries=3, on_error=self._on_error, **kw)

    def _on_error(self, error: Any, batch: Any) -> None:
        self.errors.append(error)

    async def send_all(self, prefix: str = "py") -> None:
        c = self.client
        for i in range(N_TRACKS):   # enqueueing never blocks: the consumer thread posts
            c.track(user_id="py-user", event="Python Event", properties={"i": i},
                    message_id=f"{prefix}-{i}")
        c.identify(user_id="py-user", traits={"plan": "pro"}, message_id=f"{prefix}-identify")
        c.page(user_id="py-user", name="Home", message_id=f"{prefix}-page")
        c.screen(user_id="py-user", name="Settings", message_id=f"{prefix}-screen")
        c.group(user_id="py-user", group_id="g1", traits={"n": 3}, message_id=f"{prefix}-group")
        c.alias(previous_id="anon-1", user_id="py-user", message_id=f"{prefix}-alias")
        await asyncio.to_thread(c.flush)   # the agent runs on this loop meanwhile
        await asyncio.to_thread(c.join)


@pytest.mark.parametrize("gzip", [False, True])
async def test_every_event_arrives_at_a_segment_upstream(make_agent: Any,
                                                         fake_segment: FakeSegment,
                                                         gzip: bool) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    run = SdkRun(f"http://127.0.0.1:{agent.port}", "py-key", gzip=gzip)
    await run.send_all()
    assert run.errors == []
    await wait_for(lambda: len(fake_segment.events) == N_EVENTS)
    ids = fake_segment.message_ids()
    assert len(set(ids)) == N_EVENTS and ids[:N_TRACKS] == [f"py-{i}" for i in range(N_TRACKS)]
    assert agent.spool.counters.get("duplicates", 0) == 0    # no resend while healthy
    assert {r.write_key for r in fake_segment.requests} == {"py-key"}
    types = [e["type"] for e in fake_segment.events[N_TRACKS:]]
    assert types == ["identify", "page", "screen", "group", "alias"]
    assert fake_segment.events[0]["context"]["library"]["name"] == "analytics-python"


async def test_every_event_arrives_at_a_nucleus_upstream(make_agent: Any,
                                                         fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    run = SdkRun(f"http://127.0.0.1:{agent.port}", "py-key")
    await run.send_all()
    assert run.errors == []
    await wait_for(lambda: len(fake_nucleus.events) == N_EVENTS)
    assert [e["payload"]["messageId"] for e in fake_nucleus.events[:N_TRACKS]] == [
        f"py-{i}" for i in range(N_TRACKS)]
    assert [e["type"] for e in fake_nucleus.events[N_TRACKS:]] == [
        "props", "nucleus:view", "nucleus:view", "event", "userid"]
    assert set(fake_nucleus.paths) == {"/app/py-key/track"}
    assert agent.spool.counters.get("duplicates", 0) == 0


class StallingProxy:
    """Forwards to the agent, but holds the first reply past the SDK's timeout."""

    def __init__(self, target: str, stall_s: float) -> None:
        self.target = target
        self.stall_s = stall_s
        self.retry_counts: list[str] = []
        self.first_batch = 0   # the events of the batch whose reply is held
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.retry_counts.append(request.headers.get("X-Retry-Count", "0"))
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()
                   if k in ("Authorization", "Content-Type", "Content-Encoding")}
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.post(self.target + request.path_qs, data=body, headers=headers) as r:
                status, reply = r.status, await r.read()
        if len(self.retry_counts) == 1:
            self.first_batch = len(orjson.loads(body)["batch"])
            await asyncio.sleep(self.stall_s)   # committed by the agent; the reply is "lost"
        return web.Response(status=status, body=reply, content_type="application/json")

    async def start(self) -> StallingProxy:
        app = web.Application()
        app.router.add_post("/v1/batch", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False, auto_decompress=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = int(self.runner.addresses[0][1])
        return self


async def test_resend_after_sdk_timeout_is_delivered_once(make_agent: Any,
                                                          fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    proxy = await StallingProxy(f"http://127.0.0.1:{agent.port}", stall_s=2.5).start()
    try:
        run = SdkRun(f"http://127.0.0.1:{proxy.port}", "py-key", timeout=1)
        run.client.track(user_id="u", event="once", message_id="once-1")
        run.client.track(user_id="u", event="once", message_id="once-2")
        await run.send_all("t")
    finally:
        assert proxy.runner is not None
        await proxy.runner.cleanup()
    assert run.errors == []
    assert proxy.retry_counts[:2] == ["0", "1"]   # the SDK resent the batch it timed out on
    await wait_for(lambda: len(fake_segment.events) == N_EVENTS + 2)
    await asyncio.sleep(0.2)
    ids = fake_segment.message_ids()
    assert len(ids) == len(set(ids)) == N_EVENTS + 2    # each delivered once
    # The SDK's consumer thread cuts a batch where its upload_interval ends: the held one
    # may hold once-1 alone, or more than the two.
    assert agent.spool.counters["duplicates"] >= proxy.first_batch >= 1


async def test_one_nan_refuses_its_message_alone(make_agent: Any,
                                                 fake_segment: FakeSegment) -> None:
    """Python's json.dumps writes NaN: one NaN among 50 events refused the whole batch,
    and the SDK dropped it (0 of 50 stored). Now 49 arrive, the NaN one is counted."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    run = SdkRun(f"http://127.0.0.1:{agent.port}", "py-key")
    for i in range(50):
        run.client.track(user_id="u", event="Ev", message_id=f"nan-{i}",
                         properties={"i": i, "r": float("nan") if i == 7 else 0.5})
    await asyncio.to_thread(run.client.flush)
    await asyncio.to_thread(run.client.join)
    assert run.errors == []
    await wait_for(lambda: len(fake_segment.events) == 49)
    assert "nan-7" not in fake_segment.message_ids()
    assert agent.metrics.refused == {("segment", 400): 1}
