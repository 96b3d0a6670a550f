"""Issue 14 §4 and §7: live STATUS= with the watchdog, a reload that fails on a bad config, the
unit's hardening, device facts without /proc/meminfo, the Windows task's ACLs and settings."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.install import templates as tpl
from agent.install.plan import Run, Target, build_plan
from tests.conftest import ROOT, AgentProcess, free_port, write_config
from tests.fakes.ops_scene import post_events
from tests.test_dead_many import outpost_in_thread
from tests.test_packaging import unit_sections
from tests.waiting import wait_for


@pytest.mark.skipif(sys.platform == "win32", reason="AF_UNIX datagrams")
async def test_every_watchdog_ping_carries_the_live_queue_depth(
        tmp_path: Path, notify_socket: tuple[socket.socket, str],
        agent_process: Callable[..., AgentProcess]) -> None:
    sock, notify = notify_socket
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    # WatchdogSec=0.2 s: a ping every 0.1 s. No upstream, so posted events stay queued.
    agent = agent_process(cfg, port, env={"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "200000"})
    await asyncio.to_thread(agent.start)
    await post_events(port, "k", range(3))

    def until_depth() -> bytes:
        seen = []
        for _ in range(150):   # 15 s of pings, at most
            seen.append(sock.recv(4096))
            if b"WATCHDOG=1" in seen[-1] and b"3 events queued" in seen[-1]:
                return seen[-1]
        raise AssertionError(f"no ping with the live depth: {seen[-3:]}")
    datagram = await asyncio.to_thread(until_depth)
    assert datagram.split(b"\n")[0] == b"WATCHDOG=1"
    assert datagram.split(b"\n")[1].startswith(b"STATUS=")
    assert agent.terminate() == 0


def test_the_system_unit_is_hardened_and_tagged() -> None:
    service = unit_sections(tpl.systemd_unit("/usr/bin/python3", system=True))["Service"]
    assert service["SyslogIdentifier"] == "outpost"
    assert service["ProtectProc"] == "invisible"
    assert service["RemoveIPC"] == "yes"
    assert service["PrivateUsers"] == "yes"
    assert service["ProcSubset"] == "pid"
    assert service["LimitNOFILE"] == "8192"
    user = unit_sections(tpl.systemd_unit("/usr/bin/python3", system=False))["Service"]
    assert user["SyslogIdentifier"] == "outpost"


@pytest.mark.parametrize("system", [True, False])
def test_exec_reload_validates_the_config_before_the_signal(system: bool) -> None:
    service = unit_sections(tpl.systemd_unit("/usr/bin/python3", system=system))["Service"]
    assert service["ExecReload"] == "/usr/bin/python3 -m agent check-config --reload $MAINPID"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP")
async def test_check_config_reload_signals_only_a_valid_config(
        make_agent: Callable[..., Any], tmp_path: Path) -> None:
    """The agent runs in this process (its PID is this one's): SIGHUPs to it are counted."""
    agent = await make_agent(port=free_port())
    bad = tmp_path / "bad.toml"
    bad.write_text("[listen]\nport = -1\n")
    hups: list[int] = []
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, hups.append, 1)
    try:
        code, out = await outpost_in_thread("check-config", str(bad), "--reload",
                                            str(os.getpid()))
        assert code == 2, out
        assert "reload refused" in out and "listen.port" in out
        code, out = await outpost_in_thread("check-config", agent.config_path, "--reload",
                                            str(os.getpid()))
        assert code == 0, out
        await wait_for(lambda: hups)
        assert hups == [1], "the config that does not validate was signalled too"
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


def test_device_facts_survive_a_proc_without_meminfo(tmp_path: Path) -> None:
    # ProcSubset=pid hides /proc/meminfo; psutil.PROCFS_PATH is the reader's one seam.
    code = ("import psutil, sys; psutil.PROCFS_PATH = sys.argv[1]; "
            "from agent.cli import main; raise SystemExit(main(['doctor', '--config', sys.argv[2]]))")
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "no-proc"), str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    ram = [line.split()[-1] for line in run.stdout.splitlines() if line.strip().startswith("totalRam")]
    assert ram and int(ram[0]) > 0, run.stdout


# -- §7 Windows --------------------------------------------------------------------------------

NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
PF_PY = r"C:\Program Files\Outpost\venv\Scripts\pythonw.exe"


@pytest.mark.parametrize("system", [True, False])
def test_the_task_sets_a_working_directory_and_normal_priority(system: bool) -> None:
    root = ET.fromstring(tpl.task_xml(PF_PY, system=system, user=r"PC\ada").encode("utf-16"))
    assert root.findtext("t:Settings/t:Priority", namespaces=NS) == "5"
    workdir = root.findtext("t:Actions/t:Exec/t:WorkingDirectory", namespaces=NS)
    assert workdir == (r"%ProgramData%\outpost" if system else r"%LOCALAPPDATA%\outpost")


def test_a_system_task_locks_its_data_directory_down() -> None:
    target = Target("win32", True, PF_PY, r"C:\Users\ada", user=r"PC\ada",
                    config_home=r"C:\Users\ada\AppData\Local")
    plan = build_plan("install", target)
    runs = [s.argv for s in plan.steps if isinstance(s, Run)]
    icacls = [argv for argv in runs if argv[0] == "icacls"]
    assert icacls == [("icacls", r"C:\ProgramData\outpost", "/inheritance:r",
                       "/grant:r", "*S-1-5-18:(OI)(CI)F", "/grant:r", "*S-1-5-32-544:(OI)(CI)F")]
    assert runs.index(icacls[0]) < runs.index(("schtasks", "/Run", "/TN", "Outpost"))
    assert plan.warnings == ()


def test_a_system_task_outside_program_files_is_warned_about() -> None:
    target = Target("win32", True, r"C:\outpost\venv\Scripts\pythonw.exe", r"C:\Users\ada")
    plan = build_plan("install", target)
    assert any("Program Files" in w for w in plan.warnings), plan.warnings


def test_operations_says_what_a_scheduled_task_lacks() -> None:
    ops = (ROOT / "docs" / "operations.md").read_text()
    for word in ("services.msc", "recovery actions", "Event Log", "icacls", "Program Files"):
        assert word in ops, word


@pytest.mark.skipif(sys.platform == "win32", reason="the environment variable on POSIX")
def test_programdata_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROGRAMDATA", r"D:\Data")
    from agent.install.command import current_target
    assert current_target(system=True).program_data == r"D:\Data"
    assert os.environ["PROGRAMDATA"] == r"D:\Data"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="netlink")
@pytest.mark.parametrize("system", [True, False])
async def test_the_units_let_the_agent_open_every_socket_family_it_uses(system: bool) -> None:
    # agent/netwatch.py watches the network on an AF_NETLINK socket: a RestrictAddressFamilies=
    # without it fails that socket() (EAFNOSUPPORT) under the service alone, where the
    # watcher was then off for good, logged at info as if in a sandbox the operator chose.
    from agent import netwatch

    watcher = netwatch.watch(lambda: None)
    if watcher is None:
        pytest.skip("no netlink here")
    assert isinstance(watcher, netwatch.NetlinkWatch)
    opened = {watcher._sock.family.name}
    watcher.close()
    service = unit_sections(tpl.systemd_unit("/usr/bin/python3", system=system))["Service"]
    allowed = set(service["RestrictAddressFamilies"].split())
    assert opened | {"AF_UNIX", "AF_INET", "AF_INET6"} <= allowed, allowed


@pytest.mark.skipif(sys.platform == "win32", reason="AF_UNIX datagrams")
async def test_a_notify_socket_nobody_reads_is_a_warning_not_a_silent_death(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """NOTIFY_SOCKET names a socket the agent cannot reach (a container started by a
    Type=notify unit, the socket not mounted in): READY=1 and every watchdog ping were
    dropped with a debug line only, and systemd killed the agent at its start timeout
    with nothing in the agent's own log to say why. Each kind of message that fails is
    a warning, once a minute, naming the socket and what systemd will do."""
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    nobody = tmp_path / "nobody.sock"
    # WatchdogSec=0.2 s: a failed ping every 0.1 s, which must not flood the log.
    agent = agent_process(cfg, port, env={"NOTIFY_SOCKET": str(nobody),
                                          "WATCHDOG_USEC": "200000"})
    await asyncio.to_thread(agent.start)

    def warned(what: str) -> bool:
        return any("WARNING" in line and what in line and str(nobody) in line
                   for line in agent.log.read_text().splitlines())
    for _ in range(100):   # 5 s at most
        if warned("ready") and warned("watchdog"):
            break
        await asyncio.sleep(0.05)
    assert agent.terminate() == 0
    text = agent.log.read_text()
    assert warned("ready") and warned("watchdog"), text
    assert text.count("watchdog") == 1, text   # once a minute, not every 0.1 s
