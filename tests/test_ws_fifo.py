"""FIFO per key over a websocket upstream that keeps dropping.

Several batches are in flight on one websocket. When the connection drops,
none of a key's later batches may reach the upstream before an earlier one
that is still unacknowledged: only the forwarder, once every in-flight batch
has settled, opens a new connection and resends from its cursor.

Order is measured at the upstream, by the first arrival of each event: an event
first seen after a later event of the same key is an inversion. Resends of events
already seen (the unacknowledged rest of a dropped connection) are allowed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from agent.forwarder.backoff import Backoff
from agent.forwarder.supervisor import Seams
from agent.settings import UpstreamConfig
from agent.uplinks.base import Acked
from agent.uplinks.nucleus_ws import NucleusWsUplink
from tests.fakes.faulty_upstream import FaultyUpstream
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_uplink_nucleus import row
from tests.test_upstream_faults import event, send, upstream
from tests.waiting import wait_for

KEYS = 4
PER_POST = 2500   # events per Nucleus HTTP batch posted to the agent
POSTS = 5         # per key: 4 keys x 5 posts x 2500 = 50,000 events
FLAP_EVERY = 7    # frames
# A drop a few ms after the frame arrives lands while the agent is doing something
# else (reading its spool, say), as on a real network; 0 hid the bug.
FLAP_DELAY_S = 0.003


@pytest.fixture
def fast_backoff() -> Seams:
    """Reconnects in milliseconds, faster than conftest's: make_agent builds with these."""
    return Seams(backoff=Backoff(base_s=0.005, cap_s=0.02))


@pytest.fixture
async def flapping(fast_backoff: Seams) -> AsyncIterator[FaultyUpstream]:
    fake = await FaultyUpstream().start()
    fake.flap_every = FLAP_EVERY
    fake.flap_delay = FLAP_DELAY_S
    yield fake
    await fake.stop()


def inversions(fake: FaultyUpstream) -> dict[str, list[tuple[int, int]]]:
    """Per key: (event, the later event of that key first seen before it)."""
    seen: dict[str, set[int]] = {}
    latest: dict[str, int] = {}
    found: dict[str, list[tuple[int, int]]] = {}
    for rec in fake.requests:
        key = rec.path.split("/")[2]
        keyed = seen.setdefault(key, set())
        for ev in rec.events:
            i = ev["id"]
            if i in keyed:
                continue
            keyed.add(i)
            if i < latest.get(key, -1):
                found.setdefault(key, []).append((i, latest[key]))
            latest[key] = max(latest.get(key, -1), i)
    return found


async def test_no_inversions_over_a_flapping_websocket(make_agent: Any,
                                                       flapping: FaultyUpstream) -> None:
    # 100-event frames: enough of them for the connection to flap 20 times.
    agent = await make_agent(upstreams=[upstream(flapping, "nucleus-ws", timeout_s=2.0,
                                                 max_in_flight=4, batch_max_events=100)])
    for p in range(POSTS):
        for k in range(KEYS):
            await send(agent, [event(p * PER_POST + i) for i in range(PER_POST)],
                       key=f"app{k}")
    await wait_for(lambda: agent.spool.depth == 0, timeout=30)
    total = KEYS * POSTS * PER_POST
    assert sum(len(r.events) for r in flapping.requests) >= total
    assert len(flapping.faulted()) >= 20   # the connection really flapped
    got = inversions(flapping)
    assert {k: len(v) for k, v in got.items()} == {}, {k: v[:5] for k, v in got.items()}
    firsts = {(rec.path, ev["id"]) for rec in flapping.requests for ev in rec.events}
    assert len(firsts) == total   # every event arrived, none is missing
    assert await agent.spool.dead_letters() == []


async def test_an_idle_drop_reconnects_without_a_failure() -> None:
    """A connection the upstream closed while every batch on it was acknowledged holds
    nothing that could be overtaken: the next batch opens a new one, with no failure."""
    fake = await FakeNucleus().start()
    cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=fake.url, timeout_s=2)
    async with aiohttp.ClientSession() as session:
        up = NucleusWsUplink(cfg, "app", session, "m")
        assert await up.send(up.prepare([row(1, {"id": 1})])) == Acked((1,))
        await fake.go_down()      # closes the websocket; returns once the agent answered
        await fake.come_back()
        again = await up.send(up.prepare([row(2, {"id": 2})]))
        assert again == Acked((2,)) and fake.connections == 2
        await up.close()
    await fake.stop()
