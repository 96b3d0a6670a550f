"""The capture API (`/v1/capture`): the seed's examples, run as written, and its errors."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from typing import Any

import pytest

from tests import seed_examples as seed
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import call, fill_spool, segment_up, wait_for

SEED_HOST = "https://analytics.chatnationbot.com"
SUCCESS = {"status": "success"}


async def test_seed_requests_as_written(make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    requests = [(seed.CAPTURE_KEYS[0], seed.CAPTURE_BODY), (seed.CAPTURE_KEYS[1], seed.CAPTURE_CURL)]
    # The three "Event Types" examples are messages: each goes in a batch as documented.
    requests += [(seed.CAPTURE_KEYS[1], '{"batch": [' + ex + "]}")
                 for ex in (seed.CAPTURE_TRACK, seed.CAPTURE_PAGE, seed.CAPTURE_IDENTIFY)]
    for key, body in requests:
        reply = await call(agent.port, "/v1/capture", body, headers={"X-Write-Key": key})
        assert reply.status == 201 and reply.json() == SUCCESS
    await wait_for(lambda: len(fake_segment.events) == 5)
    first = fake_segment.events[0]
    assert fake_segment.requests[0].write_key == "your_write_key_here"
    assert first["event"] == "Order Completed" and first["properties"]["order_id"] == "ord_456"
    assert first["context"] == {"channel": "web"}
    assert first["timestamp"] == "2026-01-20T06:30:00.000Z" and first["receivedAt"]
    assert [e["type"] for e in fake_segment.events[2:]] == ["track", "page", "identify"]


async def test_seed_python_example_runs_unchanged(make_agent: Any,
                                                  fake_segment: FakeSegment) -> None:
    pytest.importorskip("requests")
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    code = seed.CAPTURE_PYTHON.replace(SEED_HOST, f"http://127.0.0.1:{agent.port}")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code,
                                                stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert out.decode().strip() == "201"
    await wait_for(lambda: len(fake_segment.events) == 1)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_seed_node_example_runs_unchanged(make_agent: Any,
                                                fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    code = seed.CAPTURE_NODE.replace(SEED_HOST, f"http://127.0.0.1:{agent.port}")
    proc = await asyncio.create_subprocess_exec(
        "node", "--input-type=module", "-e",
        code + "\nconsole.log(response.status, await response.text());", stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert out.decode().strip() == '201 {"status":"success"}'
    await wait_for(lambda: len(fake_segment.events) == 1)


def track(**kw: Any) -> dict[str, Any]:
    return {"type": "track", "event": "e", "userId": "u", **kw}


# NBSP or U+3000 around the key is no HTTP whitespace: the key sent is not `good`, and
# taking it for `good` would change the value the app sent.
@pytest.mark.parametrize("headers", [{"X-Write-Key": "bad"}, {},
                                     {"X-Write-Key": "good\u00a0"},
                                     {"X-Write-Key": "\u3000good"}],
                         ids=["bad", "missing", "nbsp", "ideographic-space"])
async def test_bad_or_missing_key_is_401(make_agent: Any, headers: dict[str, str]) -> None:
    agent = await make_agent(listen={"accept_keys": ["good"]})
    reply = await call(agent.port, "/v1/capture", {"batch": [track()]}, headers=headers)
    assert reply.status == 401 and reply.json()["status"] == "error"
    assert agent.spool.depth == 0


@pytest.mark.parametrize("body,status,fragment", [
    (b'{"batch": [', 400, "invalid JSON"),
    ({"events": []}, 400, "`batch`"),
    ({"batch": [{"type": "track", "userId": "u"}]}, 400, "batch[0]: track needs `event`"),
    ({"batch": [track(userId=None)]}, 400, "`userId` or `anonymousId`"),
    ({"batch": [{"type": "screen", "name": "s", "userId": "u"}]}, 400, "`type`"),
    ({"batch": [track(properties=[1])]}, 400, "`properties` must be an object"),
    ({"batch": [track(event=["x"])]}, 400, "`event`"),
    ({"batch": [track(properties={"x": "y" * 33_000})]}, 413, "bytes"),
    ({"batch": [track(properties={"x": "y" * 30_000})] * 150}, 413, "too large"),
])
async def test_errors(make_agent: Any, body: Any, status: int, fragment: str) -> None:
    agent = await make_agent()
    reply = await call(agent.port, "/v1/capture", body, headers={"X-Write-Key": "k"})
    assert reply.status == status
    err = reply.json()
    assert err["status"] == "error" and fragment in err["message"]
    assert agent.spool.depth == 0   # every message refused: nothing is stored


async def test_full_spool_is_429_with_retry_after(make_agent: Any) -> None:
    agent = await make_agent(storage={"max_size_mb": 1})
    await fill_spool(agent.port)
    reply = await call(agent.port, "/v1/capture", {"batch": [track()]},
                       headers={"X-Write-Key": "k"})
    assert reply.status == 429 and int(reply.headers["Retry-After"]) > 0
