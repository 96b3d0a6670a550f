"""A forwarder never dies or stalls silently (DESIGN §2.6).

Liveness: a queue whose upstream is reachable makes progress within
``flush_interval_s + timeout_s`` (plus the backoff after a failure); when it
cannot, status says why. Agents run in process against real fake upstreams on
127.0.0.1, with real spool files.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent import forwarder
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.test_upstream_faults import delivered, event, send, upstream
from tests.waiting import wait_for


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder, "BACKOFF_BASE_S", 0.02)
    monkeypatch.setattr(forwarder, "BACKOFF_CAP_S", 0.2)


@pytest.fixture
async def faulty(fast_backoff: None) -> AsyncIterator[FaultyUpstream]:
    fake = await FaultyUpstream().start()
    yield fake
    await fake.stop()


KEYS, ROUNDS = 10, 10


async def test_a_failure_during_a_spool_read_is_not_lost(make_agent: Any,
                                                          faulty: FaultyUpstream) -> None:
    """Many keys, and the websocket closes after a partial ack on each one's first frame.

    Right after sending, each key's forwarder reads the spool again; the close often lands
    during that read. Before the fix the forwarder then waited for new data without
    looking at the failure, and the key's unacknowledged half stayed queued until the app
    sent more (most rounds stalled a key here; 10 rounds make that near certain).
    Liveness bound: flush_interval_s + timeout_s + backoff is about 1 s; 5 s allowed.
    """
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws", timeout_s=0.6)])
    for r in range(ROUNDS):
        faulty.script = [Fault("close") for _ in range(KEYS)]
        keys = range(r * KEYS, (r + 1) * KEYS)
        for k in keys:
            await send(agent, [event(1000 * k + i) for i in range(10)], key=f"app{k}")
        await wait_for(lambda want=frozenset(1000 * k + i for k in keys for i in range(10)):
                       agent.spool.depth == 0 and set(delivered(faulty)) >= want, timeout=5)
    assert await agent.spool.dead_letters() == []
