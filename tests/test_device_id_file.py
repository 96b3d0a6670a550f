"""The machine id the agent keeps beside its spool where the OS has none (a container):
what `outpost doctor` and `outpost run` do when that path holds no regular file."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from agent import paths
from tests.conftest import ROOT, AgentProcess, free_port, write_config

# The CLI on a machine with no OS id: the one seam the OS's id files are read through
# (device.MACHINE_ID_FILES) names none. Its arguments follow the missing file's path.
NO_OS_ID = ("import sys; from agent import device; device.MACHINE_ID_FILES = (sys.argv[1],); "
            "from agent.cli import main; raise SystemExit(main(sys.argv[2:]))")


def _fifo_beside(spool: Path) -> Path:
    """A FIFO where the agent keeps its machine id: nothing ever writes it."""
    fifo = paths.device_id_file(spool)
    os.mkfifo(fifo)
    return fifo


def test_doctor_with_a_fifo_for_the_kept_machine_id_is_not_held(tmp_path: Path) -> None:
    """`outpost doctor` opened the file to read the kept id and waited there forever: a
    FIFO's open waits for a writer. It shows no id kept, and leaves the FIFO as it is."""
    spool = tmp_path / "spool.db"
    fifo = _fifo_beside(spool)
    cfg = write_config(tmp_path / "agent.toml", spool)
    run = subprocess.run([sys.executable, "-c", NO_OS_ID, str(tmp_path / "no-machine-id"),
                          "doctor", "--config", str(cfg)], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    [line] = [ln for ln in run.stdout.splitlines() if ln.strip().startswith("machineId")]
    assert "none kept" in line, run.stdout
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


async def test_an_agent_with_a_fifo_for_the_kept_machine_id_starts(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """`outpost run` waited forever in the same open, before it listened: no service. The
    FIFO holds no id, as an unreadable file holds none: replaced by one, and said so."""
    spool = tmp_path / "spool.db"
    fifo = _fifo_beside(spool)
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", spool, port=port)
    # The agent's own command line follows the seam's: `python -m agent run --config C`.
    seam = NO_OS_ID.replace("sys.argv[2:]", "sys.argv[sys.argv.index('agent') + 1:]")
    agent = agent_process(cfg, port, prefix=[sys.executable, "-c", seam,
                                             str(tmp_path / "no-machine-id")])
    await asyncio.to_thread(agent.start)
    assert agent.terminate() == 0
    assert stat.S_ISREG(os.lstat(fifo).st_mode) and len(fifo.read_text().strip()) == 32
    log = agent.log.read_text()
    assert f"{fifo} cannot be read (not a regular file)" in log, log
