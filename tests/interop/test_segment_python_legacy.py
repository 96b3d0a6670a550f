"""The real `rudder-sdk-python` 1.0.5 pointed at the agent: a fork of the legacy
`analytics-python` 1.x, posting and reading replies as it does (rudder-sdk-python 2.x
too). analytics-python 1.4 itself cannot be a test dependency: its wheel also installs
`segment/analytics/`, over segment-analytics-python 2.4.0's files.

These clients count only an exact 200 as success, and read `code` and `message` from any
other reply: without them, a KeyError, taken for a network error, retried a refused batch
with backoff (analytics-python 1.x: 10 times, ~17 minutes) while the client's single
consumer thread blocked and its queue overflowed. A refused batch is now given up at once
and reported through `on_error`, and a batch stored in part is answered 200 (listing what
was refused): the client has nothing to resend.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.fakes.segment_upstream import FakeSegment
from tests.fakes.stalling_relay import StallingRelay
from tests.segment_helpers import call, segment_up, wait_for

rudder = pytest.importorskip("rudder_analytics")
pytestmark = pytest.mark.interop


class LegacyRun:
    """One legacy client; what it reported to `on_error`, as (status, code, message).

    Its consumer thread is stopped at once and its loop stepped by hand (``upload``, the
    thread's own step): the thread would cut a batch wherever its upload_interval
    ended, and each test needs its messages in one batch."""

    def __init__(self, port: int, key: str, path: str = "") -> None:
        self.errors: list[tuple[int, str, str]] = []
        # max_retries=3: a retried batch takes 1 + 2 + 4 s of backoff, every retry a request.
        # ``path``: the host as configured with a path, which the client's own goes after.
        client = rudder.Client(key, host=f"http://127.0.0.1:{port}{path}", max_retries=3,
                               flush_interval=0.05, on_error=self._on_error)
        [self.consumer] = client.consumers
        self.consumer.pause()
        self.consumer.join()
        self.client = client

    def _on_error(self, error: Any, batch: Any) -> None:
        self.errors.append((getattr(error, "status", 0), getattr(error, "code", ""),
                            getattr(error, "message", repr(error))))

    async def send(self, properties: list[dict[str, Any]], prefix: str = "legacy",
                   **ids: str) -> None:
        """One batch, posted as the client posts it; ``id<i>=`` sets message i's id."""
        for i, props in enumerate(properties):
            self.client.track("u1", "Ev", props, message_id=ids.get(f"id{i}", f"{prefix}-{i}"))
        await asyncio.to_thread(self.consumer.upload)
        assert self.client.queue.empty()


@pytest.mark.parametrize("status,code", [(401, "unauthorized"), (400, "bad_request"),
                                         (413, "request_entity_too_large")])
async def test_a_refused_batch_is_reported_once_and_not_resent(
        make_agent: Any, fake_segment: FakeSegment, status: int, code: str) -> None:
    # 401: a key not accepted; 400: every message holds NaN (Python's json.dumps writes
    # it); 413: every message larger than the upstream its key is routed to can carry.
    agent = await make_agent(listen={"accept_keys": ["py-key"]},
                             upstreams=[segment_up(fake_segment, batch_max_bytes=2000)])
    run = LegacyRun(agent.port, "other-key" if status == 401 else "py-key")
    value: Any = {400: float("nan"), 413: "x" * 3000}.get(status, 1)
    await run.send([{"v": value}] * 3)
    assert [(s, c) for s, c, _ in run.errors] == [(status, code)], run.errors
    assert run.errors[0][2]   # a message the app can log
    assert agent.metrics.refused == {("segment", status): 1}   # one request: no resend
    assert agent.spool.depth == 0


async def test_a_batch_stored_in_part_is_not_resent(make_agent: Any,
                                                    fake_segment: FakeSegment) -> None:
    """The audit's repros: one of 5 messages with a 120-character messageId; and Python's
    NaN in one of 50 (0 of 50 were stored)."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    run = LegacyRun(agent.port, "py-key")
    await run.send([{"i": i} for i in range(5)], id2="x" * 120)
    await run.send([{"i": i, "r": float("nan") if i == 7 else 0.5} for i in range(50)], "nan")
    assert run.errors == []
    assert agent.metrics.refused == {("segment", 400): 2}   # counted, once each
    await wait_for(lambda: len(fake_segment.events) == 4 + 49)
    assert all(e["properties"].get("r", 0.5) == 0.5 for e in fake_segment.events)


async def test_a_full_batch_of_rudder_sdk_python_is_stored_whole(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """rudder-sdk-python batches up to 100 messages and 4 MiB (RudderStack's request limit),
    not Segment's 500 KB: 100 messages of 6 KB are one 600 KB request. A 413 for it made
    the client drop all 100 (a 4xx is final to it)."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    run = LegacyRun(agent.port, "py-key")
    await run.send([{"i": i, "lines": "x" * 6000} for i in range(100)])
    assert run.errors == []
    await wait_for(lambda: len(fake_segment.events) == 100)
    assert sorted(e["properties"]["i"] for e in fake_segment.events) == list(range(100))


async def test_a_batch_posted_to_a_path_no_route_serves_is_reported_once_naming_it(
        make_agent: Any) -> None:
    """A host configured with a path (`http://127.0.0.1:8765/v1`, as some SDKs' docs ask
    for the full batch URL) posts to `/v1/v1/batch`: the 404 must carry `code` and
    `message` too, or the client takes its KeyError for a network error and resends the
    batch with backoff (10 times over ~17 minutes, its one sending thread blocked)."""
    agent = await make_agent()
    run = LegacyRun(agent.port, "py-key", path="/v1")
    await run.send([{"v": 1}])
    [(status, code, message)] = run.errors
    assert (status, code) == (404, "not_found"), run.errors
    assert "/v1/v1/batch" in message
    assert agent.metrics.refused == {("unrouted", 404): 1}   # one request: no resend
    assert agent.spool.depth == 0


async def test_a_refusal_by_host_is_legible_to_the_client(make_agent: Any) -> None:
    """The guard's 421 (a device's own name as the host, listening beyond loopback) carries
    the `code` and `message` these clients read from any reply but a 200."""
    agent = await make_agent()
    reply = await call(agent.port, "/v1/batch", {"batch": []},
                       headers={"Host": f"edgebox.local:{agent.port}"})
    assert reply.status == 421
    body = reply.json()
    assert body["code"] == "misdirected_request" and "edgebox.local" in body["message"]


async def test_a_batch_whose_body_stalled_is_sent_again_not_dropped(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """A body not received whole within listen.body_timeout_s was answered 408. These
    clients give up a batch answered any 4xx but 429 (rudder-sdk-python's `fatal_exception`;
    RudderStack's JavaScript SDK likewise): the app's events were lost for a stall, which
    the same request, sent again, gets through. The answer must be one they retry."""
    agent = await make_agent(listen={"body_timeout_s": 0.3},
                             upstreams=[segment_up(fake_segment)])
    relay = await StallingRelay(agent.port).start()
    try:
        run = LegacyRun(relay.port, "py-key")
        await run.send([{"i": i} for i in range(3)])
        assert relay.stalled, "the first request did not stall"
        assert run.errors == [], run.errors
        await wait_for(lambda: len(fake_segment.events) == 3)
        assert sorted(e["properties"]["i"] for e in fake_segment.events) == [0, 1, 2]
    finally:
        await relay.stop()
