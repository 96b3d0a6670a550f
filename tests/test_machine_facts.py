"""Device facts read from the machine (the environment's locale, the OS's names) are held
to the rule of agent.toml's [device] values: one that breaks it is not used, as if the
machine gave none, and one warning line says which and why; the agent still starts."""

from __future__ import annotations

import asyncio
import logging
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.faulty_upstream import FaultyUpstream
from tests.waiting import wait_for

KEY = "app-facts"


async def test_a_bad_locale_in_the_environment_is_skipped_and_said(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    upstream = await FaultyUpstream().start()
    port = free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[
        {"name": "up", "protocol": "nucleus-http", "url": upstream.http_url, "keys": [KEY],
         "flush_interval_s": 0.05}])
    # An escape sequence in the first variable looked at, 10,000 characters in the next:
    # both skipped, the third one (a real locale) names the language.
    agent = agent_process(config, port, env={
        "LC_ALL": "en_US\x1b[31m", "LC_MESSAGES": "fr_FR" + "x" * 9_995,
        "LANG": "de_DE.UTF-8"})
    await asyncio.to_thread(agent.start)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{agent.url}/app/{KEY}/track", json={"data": [
                    {"id": "i1", "type": "init"}]}) as r:
                assert r.status == 200, await r.text()
        await wait_for(lambda: "i1" in upstream.received_ids())
        assert agent.terminate() == 0
    finally:
        await upstream.stop()
    [init] = [ev for r in upstream.requests for ev in r.events]
    assert (init["language"], init["locale"]) == ("de-DE", "de-DE"), init
    log = agent.log.read_text()
    ignored = [line for line in log.splitlines() if "not used as the device's language" in line]
    assert len(ignored) == 2, log
    assert "LC_ALL" in ignored[0] and "control characters" in ignored[0], ignored
    assert "LC_MESSAGES" in ignored[1] and "at most 128 characters" in ignored[1], ignored
    assert "x" * 200 not in log   # the long value is not repeated in the log


async def test_an_os_release_of_bytes_no_utf8_is_left_out_and_said(
        make_agent: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A kernel release holding a byte that is no UTF-8 (a Latin-1 'é' in the kernel's
    local version): os.uname gives it as a lone surrogate, which no event can carry. Not
    used, and said, as any other bad fact: the init events it would fill are still taken."""
    monkeypatch.setattr(platform, "release", lambda: "6.1.0-caf\udce9")
    with caplog.at_level(logging.WARNING, logger="outpost"):
        agent = await make_agent()
    assert agent.facts.osVersion == ""
    said = [r.getMessage() for r in caplog.records if "device's osVersion" in r.getMessage()]
    assert len(said) == 1 and "kernel's release" in said[0], said
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{agent.port}/app/{KEY}/track", json={"data": [
                {"id": "i1", "type": "init"}]}) as r:
            assert r.status == 200, await r.text()
    assert agent.spool.depth == 1
