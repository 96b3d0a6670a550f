"""An agent runs on the spool, but not at the address the config names now: listen.port
(or host) was changed in agent.toml, which applies at the next restart (a reload names
it). Until then the commands must not say that no agent runs, read its spool as a
stopped agent's, or tell the operator to start one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import AgentProcess, free_port, write_config
from tests.test_cli_mistakes import no_agent_port, outpost
from tests.test_operator_mistakes import one_line


@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("flush",)])
def test_an_agent_listening_where_the_config_no_longer_says_is_not_called_stopped(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        args: tuple[str, ...]) -> None:
    """`outpost status` printed the spool's figures as "spool, no agent running", every
    upstream "offline", exit 0; `outpost flush` said "no agent answering ... start it"."""
    spool, port = tmp_path / "spool.db", free_port()
    cfg = write_config(tmp_path / "agent.toml", spool, port=port)
    running = agent_process(cfg, port).start()
    with no_agent_port() as other:
        write_config(cfg, spool, port=other)   # edited, not yet applied by a restart
        run = outpost(*args, "--config", str(cfg))
    line = one_line(run.stdout + run.stderr)
    assert run.returncode == 1 and run.stderr.strip() == line, (run.returncode, line)
    assert f"an agent is running on the spool {spool}" in line, line
    assert f"127.0.0.1:{other}" in line and "restart" in line, line
    assert "no agent running" not in line and "start it" not in line, line
    assert running.terminate() == 0


def test_dead_list_beside_an_agent_listening_elsewhere_does_not_say_none_runs(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """It reads the spool (exact, as any reader beside the agent), but said where from as
    "(SPOOL, no agent running)"."""
    spool, port = tmp_path / "spool.db", free_port()
    cfg = write_config(tmp_path / "agent.toml", spool, port=port)
    running = agent_process(cfg, port).start()
    with no_agent_port() as other:
        write_config(cfg, spool, port=other)
        run = outpost("dead", "list", "--config", str(cfg))
    assert run.returncode == 0 and run.stderr == "", (run.returncode, run.stderr)
    assert run.stdout.startswith("0 dead letters ("), run.stdout
    assert "no agent running" not in run.stdout, run.stdout
    assert f"an agent runs on it but does not answer at http://127.0.0.1:{other}" in run.stdout
    assert running.terminate() == 0


def test_listen_port_0_is_named_as_why_no_command_reaches_the_agent(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """listen.port = 0 has the system pick the agent's port at each start: no command can
    know it. They said the agent "is still starting, or listens where its config said when
    it started (a change to listen.port applies at a restart)" (status, flush, tail), or
    that the spool "is in use" (dead retry): untrue, and no help. Each names listen.port = 0
    and the fix, one line, exit 1; with no agent, flush says so too, not only "start it"."""
    spool, port = tmp_path / "spool.db", free_port()
    cfg = write_config(tmp_path / "agent.toml", spool, port=port)
    running = agent_process(cfg, port).start()
    write_config(cfg, spool, port=0)   # as the agent's own config says, to the commands
    for args in (("status",), ("flush",), ("tail",), ("dead", "retry", "--all")):
        run = outpost(*args, "--config", str(cfg))
        line = one_line(run.stdout + run.stderr)
        assert run.returncode == 1 and run.stderr.strip() == line, (args, run.returncode, line)
        assert f"an agent is running on the spool {spool}" in line, line
        assert PORT_0 in line and "still starting" not in line, line
    # It reads the spool (exact beside the agent), saying why not the agent: it said the
    # agent "does not answer at http://127.0.0.1:0".
    run = outpost("dead", "list", "--config", str(cfg))
    assert run.returncode == 0 and run.stderr == "", (run.returncode, run.stderr)
    first = run.stdout.splitlines()[0]
    assert first.startswith(f"0 dead letters ({spool}; an agent runs on it, but "), first
    assert PORT_0 in first and "127.0.0.1:0" not in first, first
    assert running.terminate() == 0
    run = outpost("flush", "--config", str(cfg))
    assert run.returncode == 1 and PORT_0 in run.stderr, run.stderr


PORT_0 = ("listen.port = 0 has the system pick the agent's port at each start, which no "
          "command can know: set listen.port to a fixed port")
