"""An operator's config listing thousands of app keys in upstreams' `keys`
(docs/operations.md "Many apps and keys"): routing a key costs the same however many keys
the config lists. Each start and each reload routes every queued key, so a cost per key
that grows with the list makes them grow with its square, and the event loop, which
answers apps and pings systemd's watchdog (WatchdogSec=30), stands still meanwhile.
A real agent on 127.0.0.1, a fake Segment upstream on port 0."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import call, wait_for

SMALL, LARGE = 500, 5_000


def key_of(i: int) -> str:
    return f"app-{i:06d}"


async def reload_cpu_s(make_agent: Any, spool: Path, fake: FakeSegment, keys: int) -> float:
    """The CPU time a reload of an agent whose config lists ``keys`` keys, each with an
    event queued and waiting out the upstream's Retry-After, takes (the least of three)."""
    named = [key_of(i) for i in range(keys)]
    # A catch-all after the list: an invented key is looked for in the list first.
    agent = await make_agent(spool=spool, upstreams=[
        {"name": "apps", "protocol": "segment-http", "url": fake.url, "keys": named},
        {"name": "rest", "protocol": "segment-http", "url": fake.url}])
    for start in range(0, keys, 2_500):
        batch = [{"type": "track", "userId": "u", "event": "e", "writeKey": key}
                 for key in named[start:start + 2_500]]
        reply = await call(agent.port, "/v1/batch", {"batch": batch})
        assert reply.status == 200, reply.body
    # Every key has been tried once and waits out its hour: a reload sends nothing.
    await wait_for(lambda: agent.forwarding.states["apps"].parked == keys, timeout=120)
    spent = []
    for _ in range(3):
        before = time.process_time()
        assert await agent.reload()
        spent.append(time.process_time() - before)
    assert agent.forwarding.states["apps"].parked == keys
    return min(spent)


async def test_a_reload_costs_the_same_per_key_however_many_keys_the_config_lists(
        make_agent: Any, tmp_path: Path, fake_segment: FakeSegment) -> None:
    fake_segment.outage = (503, "3600")
    small = await reload_cpu_s(make_agent, tmp_path / "small.db", fake_segment, SMALL)
    large = await reload_cpu_s(make_agent, tmp_path / "large.db", fake_segment, LARGE)
    # Ten times the keys, each looked up in a list ten times as long: 100x with a cost per
    # key that grows with the list; ~10x (less: a reload's fixed part) without.
    assert large <= 25 * small + 0.05, (
        f"a reload with {LARGE} keys listed took {large:.3f} s of CPU, with {SMALL} "
        f"{small:.3f} s")
