"""Service wiring: keys never logged, upstream state kept across a reload, system paths, the
dedupe index out of the cyclic GC's walks."""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import config as config_mod
from agent import logs, paths
from agent.logs import RedactingFilter
from agent.server import memory
from agent.service import Agent
from agent.spool.dedupe import DedupeIndex
from tests.conftest import write_config
from tests.fakes.ops_scene import RefusingUpstream, post_events
from tests.waiting import wait_for


def redacted(text: str) -> str:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, text, None, None)
    RedactingFilter().filter(record)
    return record.getMessage()


async def test_configured_and_ingested_keys_never_reach_the_log(make_agent: Any,
                                                               tmp_path: Path) -> None:
    await make_agent(listen={"accept_keys": ["accepted-key-1"]}, spool=tmp_path / "a.db")
    agent = await make_agent(upstreams=[{"name": "u", "protocol": "nucleus-http",
                                         "url": "http://127.0.0.1:9", "key": "upstream-key-7",
                                         "keys": ["routed-key-3", "*"]}])
    for key in ("accepted-key-1", "upstream-key-7", "routed-key-3"):
        assert redacted(f"upstream said no to {key}") == "upstream said no to ***"
    # A key first seen at ingest is registered when its stream is created.
    assert redacted("path /app/seen-at-ingest-9/track") == "path /app/seen-at-ingest-9/track"
    await post_events(agent.port, "seen-at-ingest-9", range(1))
    assert redacted("path /app/seen-at-ingest-9/track") == "path /app/***/track"


async def test_reload_keeps_upstream_state(make_agent: Any, tmp_path: Path) -> None:
    down = await RefusingUpstream(503, retry_after=3600).start()
    try:
        ups = [{"name": "down", "protocol": "nucleus-http", "url": down.url,
                "flush_interval_s": 0.05}]
        agent = await make_agent(upstreams=ups)
        await post_events(agent.port, "k", range(2))
        await wait_for(lambda: agent.forwarding.states["down"].state == "backoff")
        write_config(Path(agent.config_path), tmp_path / "spool.db",
                     upstreams=[{**ups[0], "protocol": "nucleus-ws",
                                 "url": down.url.replace("http", "ws")}])
        await agent.reload()
        state = agent.forwarding.states["down"]
        assert (state.retries, state.last_error, state.protocol) == (
            1, 'HTTP 503: {"error": "refused by the test"}; next try in 3600s, as its '
            "Retry-After asks", "nucleus-ws")
    finally:
        await down.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux layout")
def test_linux_system_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("STATE_DIRECTORY", "CONFIGURATION_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OUTPOST_SYSTEM", "1")
    assert paths.config_dir() == Path("/etc/outpost")
    assert paths.default_spool_path() == Path("/var/lib/outpost/spool.db")
    # systemd's own directories win (they can be renamed in a drop-in).
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/private/outpost:/var/lib/other")
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", "/etc/outpost-test")
    assert paths.data_dir() == Path("/var/lib/private/outpost")
    assert paths.config_dir() == Path("/etc/outpost-test")
    monkeypatch.setenv("OUTPOST_SYSTEM", "0")
    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/u/.cfg")
    assert paths.config_dir() == Path("/home/u/.cfg/outpost")


def test_secret_registration_is_idempotent() -> None:
    logs.register_secret("idempotent-key-5")
    logs.register_secret("idempotent-key-5")
    assert redacted("k=idempotent-key-5") == "k=***"


async def test_the_start_hands_over_the_rebuilt_index_before_it_listens(make_agent: Any,
                                                                       tmp_path: Path) -> None:
    """``outpost run`` freezes what the start built once the spool is open (memory.py
    ``settle_start``): the hook sees the whole index, and no listener yet."""
    first = await make_agent(spool=tmp_path / "s.db")
    await post_events(first.port, "k", range(5))
    await first.stop()
    seen: list[tuple[int, object]] = []
    cfg_path = write_config(tmp_path / "again.toml", tmp_path / "s.db")
    again = Agent(config_mod.load_file(cfg_path), str(cfg_path),
                  on_spool_open=lambda: seen.append((len(again.spool.index), again.listener)))
    await again.start()
    try:
        assert seen == [(5, None)]
    finally:
        await again.stop()


def test_a_frozen_index_is_not_walked_by_the_collector() -> None:
    """A set of 1M ints cost each collection of its generation ~90 ms (bench/RESULTS.md):
    frozen, no generation holds it."""
    index = DedupeIndex(3_600_000, 1000)
    index.admit(list(range(100)), 0, 0)
    assert gc.is_tracked(index.keys)
    frozen = gc.get_freeze_count()
    memory.settle_start()
    try:
        assert gc.get_freeze_count() > frozen
        assert all(o is not index.keys for o in gc.get_objects())
    finally:
        gc.unfreeze()
