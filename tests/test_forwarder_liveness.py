"""A forwarder never dies or stalls silently (DESIGN §2.6).

Liveness: a queue whose upstream is reachable makes progress within
``flush_interval_s + timeout_s`` (plus the backoff after a failure); when it
cannot, status says why. Agents run in process against real fake upstreams on
127.0.0.1, with real spool files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from agent import forwarder
from agent.uplinks.factory import make_uplink
from agent.uplinks.nucleus_ws import NucleusWsUplink
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.test_upstream_faults import delivered, drained, event, send, upstream
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


# -- supervision: one point catches, logs, counts, shows and restarts ---------------------------


async def get(agent: Any, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}{path}") as r:
        assert r.status == 200
        return await (r.json() if path == "/status" else r.text())


def crash_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_crash_in_a_delivery_is_logged_counted_shown_and_restarted(
        make_agent: Any, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture) -> None:
    """A real code path that raises: a `Retry-After: ²` header (`"²".isdigit()` is True,
    `float("²")` raises ValueError) escapes the HTTP uplink as an unexpected exception.
    Before the fix the delivery task died unseen and the key's events stayed queued."""
    caplog.set_level(logging.INFO)
    faulty.script = [Fault("status", 503, {"Retry-After": "\u00b2"})]
    # A name of its own: crash logs are rate-limited per upstream, process-wide.
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", name="crashy")])
    await send(agent, [event(i) for i in range(5)])
    await drained(agent, faulty, 5)
    state = agent.forwarding.states["crashy"]
    assert state.crashes == 1 and state.retries == 0
    assert "ValueError" in (state.last_error or "")
    (status,) = (await get(agent, "/status"))["upstreams"]
    assert status["crashes"] == 1 and "ValueError" in status["last_error"]
    assert 'outpost_upstream_crashes_total{upstream="crashy"} 1' in await get(agent, "/metrics")
    # Logged once, with its traceback, at the supervision point; nothing else complains
    # (no "Task exception was never retrieved").
    (record,) = crash_records(caplog)
    assert record.name == "outpost.routing" and "crashy" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ValueError


class _BrokenReader(NucleusWsUplink):
    """INJECTED FAULT (factory level): no reply an upstream can send breaks the websocket
    reader, so this uplink's reader raises on its first reply, standing in for any bug
    in an uplink's own background task."""

    broke = False

    def _on_message(self, link: Any, data: str | bytes) -> None:
        if not self.broke:
            self.broke = True
            raise KeyError("injected reader fault")
        super()._on_message(link, data)


async def test_a_crash_in_an_uplink_task_is_supervised(
        make_agent: Any, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws", name="crashy-ws")])
    made: list[Any] = []

    def factory(cfg: Any, key: str, session: aiohttp.ClientSession, machine_id: str) -> Any:
        uplink = (_BrokenReader(cfg, key, session, machine_id) if not made
                  else make_uplink(cfg, key, session, machine_id))
        made.append(uplink)
        return uplink

    agent.forwarding.make_uplink = factory
    await send(agent, [event(i) for i in range(5)])
    await drained(agent, faulty, 5)
    assert made[0].broke and len(made) == 2   # restarted with a fresh uplink
    state = agent.forwarding.states["crashy-ws"]
    assert state.crashes == 1 and "injected reader fault" in (state.last_error or "")
    (record,) = crash_records(caplog)
    assert record.exc_info is not None and record.exc_info[0] is KeyError


async def test_stop_cuts_the_restart_backoff_short(make_agent: Any, faulty: FaultyUpstream,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder, "BACKOFF_BASE_S", 300.0)   # restart in 150 to 300 s
    monkeypatch.setattr(forwarder, "BACKOFF_CAP_S", 600.0)
    faulty.script = [Fault("status", 503, {"Retry-After": "\u00b2"})]
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", name="crashy-stop")])
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["crashy-stop"]
    await wait_for(lambda: state.state == "restarting")
    assert state.crashes == 1
    await asyncio.wait_for(agent.stop(), 3)
