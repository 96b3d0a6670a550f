"""The real npm `@segment/analytics-node` 3.1.0 pointed at the agent (only `host` changes).

Every event arrives upstream, at a Segment collector and at a Nucleus server, and
no request is retried while the agent is healthy.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import fill_spool, nucleus_up, segment_up, wait_for

NODE_DIR = Path(__file__).parent / "node"
pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")]

COUNT = 40
TOTAL = COUNT + 5


async def run_node(port: int, key: str) -> list[str]:
    if not (NODE_DIR / "node_modules" / "@segment" / "analytics-node").exists():
        pytest.fail("run `npm ci --prefix tests/interop/node` first")
    proc = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "segment_send.mjs"), f"http://127.0.0.1:{port}", key, str(COUNT),
        cwd=NODE_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    lines = out.decode().splitlines()
    assert proc.returncode == 0, "\n".join(lines[-30:])
    assert lines[-1] == 'DONE {"errors":0}', "\n".join(lines[-30:])
    requests = [line.split() for line in lines if line.startswith("REQUEST ")]
    assert requests and all(retry == "0" for _, retry, _ in requests)   # no resend
    assert sum(int(n) for _, _, n in requests) == TOTAL
    assert {line for line in lines if line.startswith("RESPONSE ")} == {"RESPONSE 200"}
    return lines


async def test_every_event_arrives_at_a_segment_upstream(make_agent: Any,
                                                         fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await run_node(agent.port, "node-key")
    await wait_for(lambda: len(fake_segment.events) == TOTAL)
    ids = fake_segment.message_ids()
    assert ids[:COUNT] == [f"node-{i}" for i in range(COUNT)] and len(set(ids)) == TOTAL
    assert {r.write_key for r in fake_segment.requests} == {"node-key"}
    assert [e["type"] for e in fake_segment.events[COUNT:]] == [
        "identify", "page", "screen", "group", "alias"]
    lib = fake_segment.events[0]["context"]["library"]
    assert lib["name"] == "@segment/analytics-node", json.dumps(lib)
    assert agent.spool.counters.get("duplicates", 0) == 0


async def test_every_event_arrives_at_a_nucleus_upstream(make_agent: Any,
                                                         fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    await run_node(agent.port, "node-key")
    await wait_for(lambda: len(fake_nucleus.events) == TOTAL)
    assert [e["payload"]["messageId"] for e in fake_nucleus.events[:COUNT]] == [
        f"node-{i}" for i in range(COUNT)]
    assert [e["name"] for e in fake_nucleus.events[:COUNT]] == ["Node Event"] * COUNT
    assert set(fake_nucleus.paths) == {"/app/node-key/track"}


async def test_a_string_cut_inside_an_emoji_refuses_its_message_alone(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """One lone surrogate refused the whole batch, and the SDK dropped it (0 of 10 stored).
    Now the other 9 arrive, and the SDK takes the 207 as done: no resend, no error."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    proc = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "segment_surrogate.mjs"), f"http://127.0.0.1:{agent.port}",
        "node-key", "10", cwd=NODE_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    lines = out.decode().splitlines()
    assert proc.returncode == 0 and lines[-1] == 'DONE {"errors":0}', "\n".join(lines[-30:])
    assert [line for line in lines if line.startswith("RESPONSE ")] == ["RESPONSE 207"]
    await wait_for(lambda: len(fake_segment.events) == 9)
    assert "sur-3" not in fake_segment.message_ids()
    assert agent.metrics.refused == {("segment", 400): 1}


async def test_a_full_spool_is_waited_out_and_the_events_arrive_once_room_is_made(
        make_agent: Any, fake_segment: FakeSegment, fast_backoff: Any) -> None:
    """The spool full (`when_full = "reject"`, its upstream down): the SDK is refused, then
    room is made. A 503 was a counted retry for it, with its own backoff and no Retry-After:
    with `maxRetries: 1` it gave up on its second refusal and the events were lost. A 429
    with Retry-After is a wait it does not count: it tries again after each one, and
    delivers once the queue has drained."""
    fake_segment.outage = (503, None)
    agent = await make_agent(upstreams=[segment_up(fake_segment)],
                             storage={"max_size_mb": 1, "full_retry_after_s": 1})
    await fill_spool(agent.port)
    proc = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "segment_send.mjs"), f"http://127.0.0.1:{agent.port}", "node-key",
        "5", "1", cwd=NODE_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(30):
        while sum(line.startswith("RESPONSE ") for line in lines) < 2:
            line = (await proc.stdout.readline()).decode()
            if not line:
                break
            lines.append(line.rstrip("\n"))
        fake_segment.outage = None   # the queue drains: room is made
        out, _ = await proc.communicate()
    lines += out.decode().splitlines()
    assert lines[-1] == 'DONE {"errors":0}', "\n".join(lines[-30:])
    *refusals, delivered = [line for line in lines if line.startswith("RESPONSE ")]
    assert delivered == "RESPONSE 200" and set(refusals) == {"RESPONSE 429"}, refusals
    await wait_for(lambda: {f"node-{i}" for i in range(5)} <= set(fake_segment.message_ids()))
