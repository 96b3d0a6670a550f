"""A reload (a plain `kill -HUP`) of a file that `outpost run` and `outpost check-config`
refuse (exit 2: a storage.path this user cannot write, a listen.host that does not
resolve) is refused, and the running config kept, as systemd's ExecReload
(`check-config --reload`) refuses it; not applied with "a restart applies it" for a
restart that would exit 2."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentProcess, free_port, write_config
from tests.waiting import run_outpost, wait_for

EXIT_CONFIG = 2


async def _reload(agent: AgentProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(agent.url + "/status") as r:
            shown: dict[str, Any] = (await r.json())["reload"]
            return shown


@pytest.mark.parametrize("broken", ["storage", "host"])
async def test_a_reload_of_a_file_run_would_refuse_keeps_the_running_config(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], broken: str) -> None:
    port = free_port()
    spool = tmp_path / "spool.db"
    up = {"name": "old", "protocol": "segment-http", "url": "http://127.0.0.1:9"}
    cfg = write_config(tmp_path / "agent.toml", spool, port=port, upstreams=[up])
    agent = agent_process(cfg, port)
    await asyncio.to_thread(agent.start)
    assert agent.proc is not None

    # The operator renames the upstream, and makes a mistake that only a start would meet.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spool's directory should be")
    new_up = {**up, "name": "new"}
    if broken == "storage":
        write_config(cfg, blocker / "spool.db", port=port, upstreams=[new_up])
    else:
        write_config(cfg, spool, port=port, listen={"host": "a..b"}, upstreams=[new_up])
    code, out = await run_outpost("check-config", str(cfg))
    assert code == EXIT_CONFIG, out   # what systemctl reload (ExecReload) would say

    agent.proc.send_signal(signal.SIGHUP)

    async def counted() -> bool:
        shown = await _reload(agent)
        return bool(shown["applied"] + shown["refused"])
    await wait_for(counted)
    shown = await _reload(agent)
    assert (shown["applied"], shown["refused"]) == (0, 1), shown
    assert ("storage.path" if broken == "storage" else "listen.host") in shown["last_error"], \
        shown
    assert shown["needs_restart"] == [], shown
    async with aiohttp.ClientSession() as s:
        async with s.get(agent.url + "/status") as r:
            names = [u["name"] for u in (await r.json())["upstreams"]]
    assert names == ["old"]   # the running config, kept
    assert agent.terminate() == 0
