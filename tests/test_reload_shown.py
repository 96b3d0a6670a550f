"""A reload the agent refuses, or one that leaves changes waiting for a restart, shows in
/status, /metrics, `outpost status` and the status page, not in the log alone: after a
plain `kill -HUP` (launchd, a script, a systemd unit without ExecReload) the log is the
one place no operator looks, and the agent went on with a config that was not the file's."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tests.conftest import free_port, run_chromium, write_config
from tests.test_cli_mistakes import DEEP_TOML
from tests.test_tail_slots import metrics, status
from tests.waiting import run_outpost


async def problems_on_the_page(chromium: str, profile: Path, port: int) -> dict[str, str]:
    dom = await run_chromium(chromium, profile, "--virtual-time-budget=3000", "--dump-dom",
                             f"http://127.0.0.1:{port}/")
    return {k: text for k, _, text in re.findall(
        r'<li data-problem="(\w+)" data-value="(\d+)">([^<]*)</li>', dom)}


async def test_a_refused_reload_and_one_needing_a_restart_are_shown(
        make_agent: Any, chromium: str, tmp_path: Path) -> None:
    agent = await make_agent(port=free_port(), storage={"max_age_days": 30})
    config, spool = Path(agent.config_path), agent.spool.path
    assert (await status(agent.port))["reload"] == {
        "applied": 0, "refused": 0, "last_error": None, "last_error_at": None,
        "needs_restart": [], "config": str(config), "pid": os.getpid()}

    config.write_text(config.read_text() + "\n[storage]\nmax_age_days = 3\n")  # a table twice
    await agent.reload()
    shown = (await status(agent.port))["reload"]
    assert shown["refused"] == 1 and shown["applied"] == 0, shown
    assert "storage" in shown["last_error"] and shown["last_error_at"] is not None, shown
    text = await metrics(agent.port)
    assert 'outpost_config_reloads_total{result="refused"} 1' in text, text
    assert 'outpost_config_reloads_total{result="applied"} 0' in text, text
    page = await problems_on_the_page(chromium, tmp_path / "p1", agent.port)
    assert set(page) == {"reload"} and "running config kept" in page["reload"], page
    # The file mended, not yet reloaded: `outpost status` (which reads it) still says so.
    write_config(config, spool, port=agent.port, storage={"max_age_days": 7})
    code, out = await run_outpost("status", "--config", str(config))
    assert code == 0, out
    assert "reload:" in out and "refused" in out and "running config" in out, out

    await agent.reload()
    shown = (await status(agent.port))["reload"]
    assert shown["applied"] == 1 and shown["refused"] == 1, shown
    assert shown["last_error"] is None, shown   # what runs is the file's again, but:
    assert shown["needs_restart"] == ["[storage]"], shown
    code, out = await run_outpost("status", "--config", str(config))
    assert "[storage]" in out and "restart" in out, out
    page = await problems_on_the_page(chromium, tmp_path / "p2", agent.port)
    assert set(page) == {"restart"} and "[storage]" in page["restart"], page

    write_config(config, spool, port=agent.port, storage={"max_age_days": 30})   # back to what runs
    await agent.reload()
    assert (await status(agent.port))["reload"]["needs_restart"] == []


async def test_a_reload_of_a_config_nested_too_deeply_is_refused_and_the_agent_runs_on(
        make_agent: Any) -> None:
    """tomllib's RecursionError was no ConfigError: it ended the reload, and the agent with it."""
    agent = await make_agent(port=free_port())
    config = Path(agent.config_path)
    config.write_text(config.read_text() + DEEP_TOML)
    await agent.reload()
    shown = (await status(agent.port))["reload"]
    assert shown["refused"] == 1 and "nested too deeply" in shown["last_error"], shown
