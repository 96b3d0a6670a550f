"""Operations on a real agent process: SIGHUP reload, `outpost flush`, sd_notify, service install."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, AgentProcess, free_port, skip_unless_installable, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.ops_scene import post_events
from tests.waiting import run_outpost, wait_for

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signals and AF_UNIX datagrams")


def upstream(url: str, **kw: Any) -> dict[str, Any]:
    return {"name": "main", "protocol": "nucleus-ws", "url": url, "flush_interval_s": 0.05,
            "timeout_s": 2, **kw}


async def status(config: Path) -> dict[str, Any]:
    code, out = await run_outpost("status", "--json", "--config", str(config))
    assert code == 0, out
    data: dict[str, Any] = json.loads(out)
    return data


async def wait_status(config: Path, cond: Callable[[dict[str, Any]], bool]) -> None:
    deadline = time.monotonic() + 20
    while not cond(await status(config)):
        assert time.monotonic() < deadline, "agent status never got there"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_sighup_switches_upstream_without_loss_or_duplicates(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                       upstreams=[upstream(f"ws://127.0.0.1:{free_port()}")])  # nobody there
    agent = agent_process(cfg, port)
    await asyncio.to_thread(agent.start)
    await post_events(port, "k", range(40))
    await wait_status(cfg, lambda s: s["upstreams"][0]["retries"] >= 1)
    fake = await FakeNucleus().start()
    try:
        write_config(cfg, tmp_path / "spool.db", port=port, upstreams=[upstream(fake.url)])
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        await post_events(port, "k", range(40, 50))   # ingest carries on during the reload
        await wait_for(lambda: len(fake.events) >= 50, timeout=20)
        await wait_status(cfg, lambda s: s["queue_depth"] == 0)
        # A later event of the same key: the key's queue is FIFO, so once it is upstream,
        # any duplicate queued before it would be there too.
        await post_events(port, "k", range(50, 51))
        await wait_for(lambda: 50 in fake.ids(), timeout=20)
        ids = fake.ids()
    finally:
        await fake.stop()
    assert sorted(ids) == list(range(51)), "every event exactly once"
    assert [i for i in ids if i < 40] == list(range(40)), "FIFO kept across the reload"
    final = await status(cfg)
    assert final["upstreams"][0]["url"] == fake.url and final["counters"]["acked"] == 51
    assert final["upstreams"][0]["retries"] >= 1, "upstream state survives a reload"
    assert agent.terminate() == 0
    assert "configuration reloaded" in agent.log.read_text()


@pytest.mark.slow
async def test_flush_sends_now(tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    port = free_port()
    fake = await FakeNucleus().start()
    try:
        cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                           upstreams=[upstream(fake.url, flush_interval_s=3600,
                                               batch_max_events=10)])
        agent = agent_process(cfg, port)
        await asyncio.to_thread(agent.start)
        await post_events(port, "k", range(10))   # the tenth fills a batch: sent at once
        await wait_for(lambda: len(fake.events) == 10, timeout=5)
        assert fake.batches == [list(range(10))], "a partial batch waits for flush_interval_s"
        await wait_status(cfg, lambda s: s["queue_depth"] == 0)
        await post_events(port, "k", range(10, 15))   # a partial batch again
        code, out = await run_outpost("flush", "--config", str(cfg))
        assert code == 0 and "flush requested; 5 events queued" in out, out
        await wait_for(lambda: len(fake.events) == 15, timeout=5)
        await wait_status(cfg, lambda s: s["queue_depth"] == 0)
        assert fake.batches == [list(range(10)), list(range(10, 15))]
        assert agent.terminate() == 0
    finally:
        await fake.stop()
    code, out = await run_outpost("flush", "--config", str(cfg))
    assert code == 1 and "no agent answering" in out


def next_message(sock: socket.socket, prefix: str, seen: list[str]) -> str:
    """The next datagram starting with ``prefix``; everything received goes into ``seen``."""
    while True:
        msg = sock.recv(4096).decode()
        seen.append(msg)
        if msg.startswith(prefix):
            return msg


@pytest.mark.slow
def test_agent_speaks_sd_notify(tmp_path: Path, notify_socket: tuple[socket.socket, str],
                                agent_process: Callable[..., AgentProcess]) -> None:
    sock, path = notify_socket
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    # WatchdogSec=0.4s: the agent must ping every 0.2 s (the interval it derives is
    # test_notify's; here: the pings keep coming, the socket's timeout a hang guard).
    agent = agent_process(cfg, port, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    agent.start()
    seen: list[str] = []
    ready = next_message(sock, "READY=1", seen)
    assert f"STATUS=listening on 127.0.0.1:{port}" in ready
    for _ in range(3):
        assert next_message(sock, "WATCHDOG=1", seen) == (
            f"WATCHDOG=1\nSTATUS=listening on 127.0.0.1:{port}, 0 events queued")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    assert next_message(sock, "RELOADING=1", seen).startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert next_message(sock, "READY=1", seen) == "READY=1"
    agent.proc.send_signal(signal.SIGTERM)
    assert next_message(sock, "STOPPING=1", seen) == "STOPPING=1"
    assert agent.proc.wait(15) == 0
    assert seen[0] == ready, "nothing before READY=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd user units")
def test_service_install_user_dry_run_through_the_cli(tmp_path: Path) -> None:
    skip_unless_installable(system=False)
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    unit = home / ".config" / "systemd" / "user" / "outpost.service"
    run = subprocess.run([sys.executable, "-m", "agent", "service", "install", "--user",
                          "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0, run.stderr
    config, out = run.stdout.split("\n", 1)
    assert config.startswith(f"config: {home / '.config' / 'outpost' / 'agent.toml'} (not found: ")
    assert out.startswith(f"[write] {unit} (mode 0644)\n")
    assert f"ExecStart={sys.executable} -m agent run\n" in out
    assert "Type=notify\n" in out and "WatchdogSec=30\n" in out
    assert out.endswith("[run] systemctl --user daemon-reload\n"
                        "[run] systemctl --user enable outpost.service\n"
                        "[run] systemctl --user restart outpost.service\n"
                        "dry run: nothing was changed\n")
    assert not home.exists(), "a dry run writes nothing"
    run = subprocess.run([sys.executable, "-m", "agent", "service", "uninstall", "--user",
                          "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0 and f"[remove] {unit}\n" in run.stdout
    assert not home.exists()


@pytest.mark.slow
async def test_sighup_with_the_config_file_gone_keeps_the_running_config(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """An agent that found its agent.toml by the lookup (./agent.toml here, or the
    platform's config directory), whose file was then removed or renamed: a reload must
    not switch it, silently, to the built-in defaults (no upstream, nothing delivered)."""
    port = free_port()
    fake = await FakeNucleus().start()
    try:
        cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                           upstreams=[upstream(fake.url)])
        agent = agent_process(cfg, port, env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")},
                              by_lookup=True)
        await asyncio.to_thread(agent.start)
        await post_events(port, "k", range(5))
        await wait_for(lambda: len(fake.events) == 5, timeout=10)
        cfg.rename(tmp_path / "agent.toml.bak")
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "reload" in agent.log.read_text(), timeout=10)
        await post_events(port, "k", range(5, 10))   # still forwarded where it was
        await wait_for(lambda: len(fake.events) == 10, timeout=10)
        assert fake.ids() == list(range(10))
        assert agent.terminate() == 0
    finally:
        await fake.stop()
    log = agent.log.read_text()
    assert "configuration reloaded" not in log
    assert "reload refused, keeping the running config: agent.toml: cannot read" in log, log
