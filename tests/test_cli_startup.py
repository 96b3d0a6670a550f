"""The operator commands start light: `check-config` (the service's ExecReload), `status`,
`flush` and `--help` import neither aiohttp nor the uplinks, the server or the file lock
that only `run` needs (`doctor` probes the upstreams through the uplinks). Those took more
than half of each command's start: 0.45-0.5 s here before, 0.2-0.25 s after. And `run`, every
agent's start, imports none of the modules of the commands it is not."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import ROOT, free_port

# Imported by `run` (and `doctor`, which probes the upstreams), never by the commands below.
HEAVY = ("aiohttp", "agent.uplinks.nucleus_ws", "agent.uplinks.segment_http", "agent.server",
         "agent.service", "agent.forwarder.supervisor", "filelock", "psutil")

PROBE = """
import json, sys
from agent.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:   # --help
    code = exc.code
print(json.dumps([code, sorted(m for m in HEAVY if m in sys.modules)]), file=sys.stderr)
"""


async def imported_by(*args: str, watch: tuple[str, ...] = HEAVY) -> tuple[int, list[str]]:
    """The exit status of `outpost *args`, and which of ``watch`` it imported."""
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", f"HEAVY = {watch!r}\n{PROBE}", *args], cwd=ROOT,
        capture_output=True, text=True, timeout=60)
    code, heavy = json.loads(run.stderr.strip().splitlines()[-1])
    return code, heavy


@pytest.mark.parametrize("command", [["check-config"], ["status", "--json"], ["flush"], ["--help"]],
                         ids=lambda c: c[0])
async def test_an_operator_command_imports_nothing_only_the_agent_needs(
        make_agent: Callable[..., Any], command: list[str]) -> None:
    agent = await make_agent(port=free_port(), upstreams=[
        {"name": "n", "protocol": "nucleus-ws", "url": "ws://127.0.0.1:9"},
        {"name": "s", "protocol": "segment-http", "url": "https://api.segment.io"}])
    cfg = agent.config_path
    where = [cfg] if command[0] == "check-config" else ["--config", cfg]
    code, heavy = await imported_by(*command, *([] if command[0] == "--help" else where))
    assert code == 0   # status and flush answered by the agent
    assert heavy == [], f"outpost {command[0]} imported {heavy}"


# The modules of the commands kept apart from agent/cli.py, and the client of a running agent.
OTHERS = ("agent.cli_tail", "agent.ops.dead_cli", "agent.install.command",
          "agent.install.config_file", "agent.ops.status_table")


async def test_run_parses_its_command_line_without_the_other_commands_modules() -> None:
    # Parsed and stopped by --help: built for every command, the parser imported them all.
    code, others = await imported_by("run", "--help", watch=OTHERS)
    assert code == 0
    assert others == [], f"outpost run imported {others}"
