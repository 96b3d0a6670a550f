"""The agent's lifecycle: a failed start leaves nothing running, a second SIGINT forces exit."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from filelock import FileLock

from agent import config as config_mod
from agent import paths
from agent.forwarder.supervisor import Seams
from agent.server import allocator
from agent.service import Agent
from agent.spool.schema import read_offline
from tests.conftest import ROOT, AgentProcess, free_port, write_config
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.ops_scene import post_events
from tests.fakes.segment_upstream import FakeSegment
from tests.test_upstream_faults import event, send
from tests.waiting import run_outpost, wait_for


def spool_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(("spool-writer", "spool-reader"))}


def open_files_under(directory: Path) -> list[str]:
    """Files under ``directory`` this process holds open (Linux: /proc/self/fd)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd listing itself, closed meanwhile
            continue
        if target.startswith(str(directory)):
            held.append(target)
    return held


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/fd")
async def test_a_start_that_cannot_listen_fails_clearly_and_leaves_nothing_running(
        tmp_path: Path, busy_port: int) -> None:
    before = spool_threads()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=busy_port)
    agent = Agent(config_mod.load_file(cfg), str(cfg))
    with pytest.raises(Exception) as failed:
        await agent.start()
    # The spool was opened before the listen failed: its writer task, its two SQLite
    # threads and its file must all be gone again.
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "spool-writer"]
    await wait_for(lambda: not spool_threads() - before, timeout=5)
    assert open_files_under(tmp_path) == []
    assert f"cannot listen on 127.0.0.1:{busy_port}" in str(failed.value)


def test_outpost_run_on_a_busy_port_exits_2_with_one_line(tmp_path: Path, busy_port: int) -> None:
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=busy_port)
    run = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    out = run.stdout + run.stderr
    assert run.returncode == 2, out
    assert "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{busy_port}" in lines[0], out
    # The line names the fix, as every operator mistake's does (README, "Short guide").
    assert "listen.port" in lines[0], out


# -- a second SIGINT ---------------------------------------------------------------------------

async def told(sock: socket.socket, what: bytes) -> None:
    """Return once the agent says ``what`` (sd_notify): STOPPING=1, its graceful stop has
    begun; RELOADING=1, a reload."""
    while not (await asyncio.to_thread(sock.recv, 4096)).startswith(what):
        pass


def all_told(sock: socket.socket) -> list[bytes]:
    """What the agent has said (sd_notify) and was not read yet: each message's first
    assignment, in order."""
    sock.setblocking(False)
    said = []
    with contextlib.suppress(BlockingIOError):
        while True:
            said.append(sock.recv(4096).split(b"\n")[0])
    return said


async def draining_agent(tmp_path: Path, faulty: FaultyUpstream,
                         notify_socket: tuple[socket.socket, str],
                         agent_process: Callable[..., AgentProcess],
                         first: signal.Signals = signal.SIGINT,
                         preexec_fn: Callable[[], None] | None = None,
                         held: Fault = Fault("timeout", delay=60)) -> AgentProcess:
    """An agent process interrupted once (SIGINT, then STOPPING=1 seen), or asked to reload
    (``first`` SIGHUP, then RELOADING=1 seen), whose graceful stop or reload is held up: the
    upstream holds a batch in flight (``held``: by default without ever answering), so the
    forwarder's settle waits (up to its 5 s bound)."""
    sock, notify = notify_socket
    faulty.script = [held]
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                       upstreams=[{"name": "up", "protocol": "nucleus-http",
                                   "url": faulty.http_url, "flush_interval_s": 0.02,
                                   "timeout_s": 60}])
    agent = agent_process(cfg, port, env={"NOTIFY_SOCKET": notify}, preexec_fn=preexec_fn)
    await asyncio.to_thread(agent.start)
    await send(agent, [event(i) for i in range(3)], key="k")   # one request: one batch
    await wait_for(lambda: len(faulty.requests) == 1)   # the batch is in flight
    assert agent.proc is not None
    agent.proc.send_signal(first)
    await told(sock, b"RELOADING=1" if first == signal.SIGHUP else b"STOPPING=1")
    return agent


def waited_out_the_grace(log: str) -> bool:
    """Whether the agent waited its 5 s for the batch held in flight: once they run out,
    the forwarders log that they cut it short. A second SIGINT exits before that (an
    order, where a bound on the exit's wall-clock time stretched on a loaded machine)."""
    return "still unanswered after" in log


async def exit_code(agent: AgentProcess, timeout: float) -> int:
    """Wait for the process to exit; its code."""
    assert agent.proc is not None
    return await asyncio.to_thread(agent.proc.wait, timeout)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="signals and AF_UNIX datagrams")
async def test_one_sigint_drains_gracefully(tmp_path: Path, faulty: FaultyUpstream,
                                            notify_socket: tuple[socket.socket, str],
                                            agent_process: Callable[..., AgentProcess]) -> None:
    """The control for the next test: one SIGINT waits for the batch in flight. Its
    answer is let go once STOPPING=1 is seen, within the 5 s settle bound (a fixed 3.5 s
    hold cost that much of the suite's time): the agent exits once it has deleted the
    acked rows, not at the bound, and not before."""
    answer = asyncio.Event()
    agent = await draining_agent(tmp_path, faulty, notify_socket, agent_process,
                                 held=Fault("slow", until=answer))
    assert agent.proc is not None and agent.proc.poll() is None, "exited before the answer"
    answer.set()
    code = await exit_code(agent, 20)
    assert code == 0
    assert read_offline(tmp_path / "spool.db")["depth"] == 0, "exited before the answer"
    (batch,) = faulty.requests
    assert batch.acked == [0, 1, 2] and batch.answered is not None
    log = agent.log.read_text()
    assert "outpost stopped" in log and not waited_out_the_grace(log), log


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="signals and AF_UNIX datagrams")
async def test_a_second_sigint_exits_at_once(tmp_path: Path, faulty: FaultyUpstream,
                                            notify_socket: tuple[socket.socket, str],
                                            agent_process: Callable[..., AgentProcess]) -> None:
    agent = await draining_agent(tmp_path, faulty, notify_socket, agent_process)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGINT)
    code = await exit_code(agent, 20)
    log = agent.log.read_text()
    assert code != 0 and not waited_out_the_grace(log), (code, log)
    assert "Traceback" not in log and "outpost stopped" not in log
    assert log.count("second interrupt") == 1, log


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="signals and AF_UNIX datagrams")
async def test_a_second_sigint_with_stdout_closed_exits_at_once_without_a_traceback(
        tmp_path: Path, faulty: FaultyUpstream, notify_socket: tuple[socket.socket, str],
        agent_process: Callable[..., AgentProcess]) -> None:
    """`outpost run >&- 2>log &` (a script's daemon): Python gives no sys.stdout, and the
    forced exit's flush of it ended in an AttributeError traceback, exit 1, not 130."""
    agent = await draining_agent(tmp_path, faulty, notify_socket, agent_process,
                                 preexec_fn=lambda: os.close(1))
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGINT)
    code = await exit_code(agent, 20)
    log = agent.log.read_text()
    assert code == 130 and not waited_out_the_grace(log), (code, log)
    assert "Traceback" not in log and log.count("second interrupt") == 1, log


def pending(pid: int, sig: signal.Signals) -> bool:
    """Whether ``sig`` waits to be delivered to process ``pid``: a second one sent then
    would be merged with it (Linux: /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        masks = [int(line.split()[1], 16) for line in status
                 if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask >> (sig - 1) & 1 for mask in masks)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/PID/status")
async def test_a_second_sigint_during_a_reload_exits_at_once(
        tmp_path: Path, faulty: FaultyUpstream, notify_socket: tuple[socket.socket, str],
        agent_process: Callable[..., AgentProcess]) -> None:
    """Ctrl-C twice during a reload's wait for the batches in flight waited it out (up to
    5 s), where during the start or the stop it exits at once."""
    agent = await draining_agent(tmp_path, faulty, notify_socket, agent_process,
                                 first=signal.SIGHUP)
    assert agent.proc is not None
    pid = agent.proc.pid
    os.kill(pid, signal.SIGINT)
    await wait_for(lambda: not pending(pid, signal.SIGINT))   # else the two are one
    os.kill(pid, signal.SIGINT)
    code = await exit_code(agent, 20)
    log = agent.log.read_text()
    assert code == 130 and not waited_out_the_grace(log), (code, log)
    assert "Traceback" not in log and "configuration reloaded" not in log, log
    assert log.count("second interrupt") == 1, log


# -- a stop during the start -------------------------------------------------------------------

@pytest.mark.skipif(sys.platform == "win32", reason="signals and AF_UNIX sockets")
async def test_sigterm_during_the_start_stops_gracefully(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        notify_socket: tuple[socket.socket, str]) -> None:
    """A service manager may stop the agent while it is still starting (a large spool, a
    slow bus). The stop is graceful: exit 0, the stop logged, never the default SIGTERM
    death, and the service manager is told it is stopping, never that it is ready. The
    start is held where it waits for the network's cost: on a bus that accepts the
    connection and never answers."""
    bus = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bus.bind(str(tmp_path / "bus"))
    bus.listen()
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                       sync={"on_metered": "hold",
                             "dbus_address": f"unix:path={tmp_path / 'bus'}"})
    sock, notify = notify_socket
    # A watchdog pinged every 50 ms: none may follow the stop.
    agent = agent_process(cfg, port, env={"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "100000"})
    agent.spawn()
    assert agent.proc is not None
    conn, _ = await asyncio.to_thread(bus.accept)   # the start is waiting for the bus now
    try:
        agent.proc.send_signal(signal.SIGTERM)
        code = await exit_code(agent, 20)
    finally:
        conn.close()
        bus.close()
    log_text = agent.log.read_text()
    assert code == 0, (code, log_text)
    assert "outpost stopped" in log_text and "Traceback" not in log_text, log_text
    assert "a stop was asked for during the start" in log_text, log_text
    assert all_told(sock) == [b"STOPPING=1"]


# -- a reload during the start -----------------------------------------------------------------

def sleeping(pid: int) -> bool:
    """Whether process ``pid`` sleeps (time.sleep): `outpost run`'s first sleep is its wait
    for the spool's lock, after the modules it defers SIGINT for have loaded."""
    with open(f"/proc/{pid}/wchan") as wchan:
        return "nanosleep" in wchan.read()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/PID/wchan")
async def test_sighup_during_the_start_is_a_reload_not_the_agents_end(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """`kill -HUP` or `outpost check-config --reload PID` (an edit applied as the agent
    starts, a config manager's reload after its start) before the agent's handlers existed
    ended it: SIGHUP's default action. systemd counts that end as clean, so it was not even
    restarted. The start is held where it waits for the spool's lock (one second at most)."""
    spool = tmp_path / "spool.db"
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", spool, port=port)
    agent = agent_process(cfg, port)
    with FileLock(paths.spool_lock(spool)):
        offset = agent.spawn()
        assert agent.proc is not None
        pid = agent.proc.pid
        await wait_for(lambda: sleeping(pid))
        os.kill(pid, signal.SIGHUP)
    await asyncio.to_thread(agent.ready, offset)
    await wait_for(lambda: "configuration reloaded" in agent.log.read_text())
    assert agent.terminate() == 0
    assert "Traceback" not in agent.log.read_text()


# -- a stop during a reload --------------------------------------------------------------------

@pytest.mark.skipif(sys.platform == "win32", reason="signals and AF_UNIX sockets")
@pytest.mark.parametrize("when", ["batches", "sync"])
async def test_a_stop_during_a_reload_starts_no_new_forwarders(
        tmp_path: Path, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture,
        notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch,
        when: str) -> None:
    """systemd's stop (SIGTERM) while a reload waits for a batch in flight (``batches``), or
    then for the first readings of a changed [sync] (``sync``: a bus that never answers):
    the reload went on to start new forwarders, which sent the batch cut short again (one
    more copy upstream, cut short in turn and sent once more at the next start), and the
    stop then waited for them too. Nor is a reload cut short reported (READY=1 after
    RELOADING=1: systemd's `reload` succeeded) or counted as applied. In-process, by real
    signals to this process, handled by ``serve``'s handlers; a grace of 0.3 s for the
    reload's wait."""
    notify, notify_path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
    caplog.set_level(logging.INFO, "outpost")
    faulty.script = [Fault("timeout", delay=60)] * 2   # a silent upstream
    cfg = tmp_path / "agent.toml"
    settings: dict[str, Any] = {
        "upstreams": [{"name": "up", "protocol": "nucleus-http", "url": faulty.http_url,
                       "flush_interval_s": 0.02, "timeout_s": 60}]}
    write_config(cfg, tmp_path / "spool.db", **settings)
    agent = Agent(config_mod.load_file(cfg), str(cfg), seams=Seams(grace_s=0.3))
    serving = asyncio.ensure_future(agent.serve())
    await wait_for(lambda: agent.listener is not None or serving.done())
    assert not serving.done()
    await post_events(agent.port, "k", range(3))
    await wait_for(lambda: len(faulty.requests) == 1)   # the batch is in flight
    assert agent.forwarding is not None
    sending = agent.forwarding.loops["k"]
    async with contextlib.AsyncExitStack() as held:
        # An app's websocket open: the stop's drain closes it (1001) before the forwarders
        # stop, time enough for new forwarders to send, as when this was seen.
        session = await held.enter_async_context(aiohttp.ClientSession())
        await held.enter_async_context(session.ws_connect(
            f"http://127.0.0.1:{agent.port}/app/w/track"))
        if when == "sync":
            bus = held.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            bus.bind(str(tmp_path / "bus"))
            bus.listen()
            write_config(cfg, tmp_path / "spool.db", **settings, sync={
                "on_metered": "hold", "dbus_address": f"unix:path={tmp_path / 'bus'}"})
        os.kill(os.getpid(), signal.SIGHUP)
        if when == "sync":   # the batch was cut short: the reload waits for the bus now
            conn, _ = await asyncio.to_thread(bus.accept)
            held.enter_context(conn)
        else:
            await wait_for(lambda: sending.stopping)   # the reload waits for that batch
        os.kill(os.getpid(), signal.SIGTERM)
        if when == "sync":
            conn.close()   # the bus gone: the reload goes on at once
        assert await asyncio.wait_for(serving, 10) == 0
    assert len(faulty.requests) == 1, "the batch cut short was sent again by new forwarders"
    assert "a stop was asked for during the reload" in caplog.text, caplog.text
    assert all_told(notify) == [b"READY=1", b"RELOADING=1", b"STOPPING=1"]
    assert agent.metrics.reloads_applied == 0


def exec_done(pid: int) -> bool:
    """Whether `outpost run` ``pid`` has re-executed itself with the C allocator
    (agent/server/allocator.py): the new image's environment has PYTHONMALLOC."""
    with open(f"/proc/{pid}/environ", "rb") as environ:
        return b"PYTHONMALLOC=malloc" in environ.read().split(b"\0")


@pytest.mark.skipif(not sys.platform.startswith("linux") or "PYTHONMALLOC" in os.environ
                    or allocator.malloc_trim() is None, reason="the allocator's re-exec")
async def test_sighup_just_after_the_allocators_re_exec_is_a_reload(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """The new image takes SIGHUP's default action until it defers it again (tens of ms
    of interpreter start): a `systemctl reload` then ended the agent, which systemd counts
    as clean (no restart). Sent as soon as the exec shows, well before that."""
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    agent = agent_process(cfg, port)
    offset = agent.spawn()
    assert agent.proc is not None
    pid = agent.proc.pid
    deadline = time.monotonic() + 10
    while not exec_done(pid):   # no sleep: the window is short
        assert time.monotonic() < deadline and agent.proc.poll() is None
    os.kill(pid, signal.SIGHUP)
    await asyncio.to_thread(agent.ready, offset)
    await wait_for(lambda: "configuration reloaded" in agent.log.read_text())
    assert agent.terminate() == 0
    assert "Traceback" not in agent.log.read_text()


# -- the commands during the drain -------------------------------------------------------------

@contextlib.asynccontextmanager
async def stopped_mid_batch(tmp_path: Path, faulty: FaultyUpstream
                            ) -> AsyncIterator[tuple[Agent, asyncio.Future[int], Path]]:
    """An agent serving as `outpost run` does, in-process, with a grace long enough that
    only the test's answer ends the drain; a batch of three events held at the upstream,
    and a real SIGTERM to this process, handled by ``serve``'s handlers: yields it draining
    (with its serve and its config). At the end the batch is answered, and the stop must
    end well."""
    answer = asyncio.Event()
    faulty.script = [Fault("slow", until=answer)]
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                       upstreams=[{"name": "up", "protocol": "nucleus-http",
                                   "url": faulty.http_url, "flush_interval_s": 0.02}])
    agent = Agent(config_mod.load_file(cfg), str(cfg), seams=Seams(grace_s=60))
    serving = asyncio.ensure_future(agent.serve())
    try:
        await wait_for(lambda: agent.listener is not None or serving.done())
        await post_events(port, "k", range(3))
        await wait_for(lambda: len(faulty.requests) == 1)   # the batch is in flight
        os.kill(os.getpid(), signal.SIGTERM)
        yield agent, serving, cfg
    finally:
        answer.set()
        assert await asyncio.wait_for(serving, 20) == 0


@pytest.mark.skipif(sys.platform == "win32", reason="signals and the spool's lock")
async def test_commands_during_the_drain_do_not_say_the_agent_is_starting(
        tmp_path: Path, faulty: FaultyUpstream) -> None:
    """`systemctl stop outpost` (SIGTERM), and the drain waits for a batch in flight (up to
    about 17 s): the listener is closed, the spool still held. `outpost status` and
    `outpost flush` meanwhile said "it is still starting (opening the spool), or it listens
    where its config said when it started": an operator who had just stopped it read that
    it was starting again. The spool's lock held as `outpost run` holds it."""
    spool = tmp_path / "spool.db"
    with FileLock(paths.spool_lock(spool)):
        async with stopped_mid_batch(tmp_path, faulty) as (agent, serving, cfg):
            listener = agent.listener
            assert listener is not None
            await wait_for(lambda: not listener.is_serving())   # the drain has begun
            for args in (("status",), ("flush",)):
                code, out = await run_outpost(*args, "--config", str(cfg))
                lines = out.strip().splitlines()
                assert code == 1 and len(lines) == 1, (args, code, out)
                assert f"an agent is running on the spool {spool}" in lines[0], lines[0]
                assert "stopping" in lines[0], lines[0]
            assert not serving.done(), "the drain ended before the commands ran"
    (batch,) = faulty.requests   # the drain waited for its answer, and sent nothing more
    assert batch.answered is not None


@pytest.mark.skipif(sys.platform == "win32", reason="signals")
async def test_a_graceful_stop_says_at_its_start_what_it_waits_for(
        tmp_path: Path, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture) -> None:
    """`systemctl stop outpost` or Ctrl-C while a batch is in flight: the drain waits up to
    about 17 s, and the log said nothing until "outpost stopped" at its end, so an operator
    could not tell a drain from a hang (and pressed Ctrl-C again, cutting it short). The
    stop's first line says what it waits for, while the batch is still held."""
    caplog.set_level(logging.INFO, logger="outpost")

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopping")]
    async with stopped_mid_batch(tmp_path, faulty) as (_, serving, _):
        await wait_for(lambda: bool(said()) or serving.done())
        assert not serving.done(), "the stop ended before saying anything"
        (line,) = said()
        assert "1 batch(es) in flight" in line and "3 events queued" in line, line
        assert "up to about" in line, line
    messages = [r.getMessage() for r in caplog.records]
    assert messages.index(line) < messages.index("outpost stopped"), messages


# -- a stop while the upstream's name is being looked up ---------------------------------------

# The C library's getaddrinfo, held for one name: as a resolver that does not answer (a
# router whose uplink is down), up to `timeout:30 attempts:5` in resolv.conf, 150 s. It
# says when it is asked, and answers (EAI_AGAIN) once the test lets it.
HELD_RESOLVER_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res) {
    static int (*real)(const char *, const char *, const struct addrinfo *,
                       struct addrinfo **);
    if (node != NULL && strcmp(node, "held-resolver.invalid") == 0) {
        const char *asked = getenv("HELD_RESOLVER_ASKED");
        const char *release = getenv("HELD_RESOLVER_RELEASE");
        if (asked != NULL)
            close(open(asked, O_CREAT | O_WRONLY, 0600));
        while (release != NULL && access(release, F_OK) != 0)
            usleep(10000);
        return EAI_AGAIN;
    }
    if (real == NULL)
        real = dlsym(RTLD_NEXT, "getaddrinfo");
    return real(node, service, hints, res);
}
"""


def preload_shim(tmp_path: Path, name: str, code: str) -> Path:
    """The C ``code`` built as a library for LD_PRELOAD (skipped without a C compiler or
    off Linux)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not sys.platform.startswith("linux") or compiler is None:
        pytest.skip("needs a C compiler and LD_PRELOAD (Linux)")
    source, shim = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    source.write_text(code)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"],
                   check=True, capture_output=True, timeout=60)
    return shim


@pytest.fixture
def held_resolver(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """The environment that holds the lookups of ``held-resolver.invalid`` in a process
    started with it, and the file that appears once one is asked; the lookups are let go
    at the end."""
    shim = preload_shim(tmp_path, "held_resolver", HELD_RESOLVER_C)
    asked, release = tmp_path / "resolver-asked", tmp_path / "resolver-release"
    try:
        yield {"LD_PRELOAD": str(shim), "HELD_RESOLVER_ASKED": str(asked),
               "HELD_RESOLVER_RELEASE": str(release)}, asked
    finally:
        release.touch()


def test_a_stop_does_not_wait_for_a_lookup_of_the_upstreams_name(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        held_resolver: tuple[dict[str, str], Path]) -> None:
    """An upstream named by a host name, a resolver that does not answer: the batch
    waiting for the lookup was cut short at the 5 s grace and `outpost stopped` logged, and
    then the process waited for the lookup itself before it exited (the event loop's close
    waits for its resolver threads): up to 150 s, past the unit's TimeoutStopSec (30 s),
    so systemd killed it and marked the unit failed, with the spool's lock held all along
    (a restart's new agent waited too). Here the lookup is held until the test ends: the
    agent must exit without it, its event kept for the next start."""
    env, asked = held_resolver
    spool, port = tmp_path / "spool.db", free_port()
    cfg = write_config(tmp_path / "agent.toml", spool, port=port,
                       upstreams=[{"name": "up", "protocol": "nucleus-http",
                                   "url": "http://held-resolver.invalid:8080",
                                   "flush_interval_s": 0.02, "timeout_s": 60}])
    agent = agent_process(cfg, port, env=env).start()
    with urllib.request.urlopen(urllib.request.Request(   # noqa: S310 - our own agent
            f"{agent.url}/app/k/track", method="POST",
            data=b'{"data": [{"type": "event", "name": "e", "id": "1", "sessionId": 1}]}',
            headers={"Content-Type": "application/json"}), timeout=10) as reply:
        assert reply.status == 200
    deadline = time.monotonic() + 15
    while not asked.exists():   # the forwarder's send waits for the lookup now
        assert time.monotonic() < deadline, agent.log.read_text()
        time.sleep(0.01)
    assert agent.terminate(timeout=60) == 0, agent.log.read_text()
    log = agent.log.read_text()
    assert "Traceback" not in log and log.rstrip().endswith("outpost stopped"), log
    assert read_offline(spool)["depth"] == 1   # not sent, not deleted: sent at the next start


# -- a lookup of the upstream's name that gets no thread ---------------------------------------

# pthread_create refused once (EAGAIN, as with a unit's TasksMax reached), when the file the
# environment names is there: the next thread the process starts is not started.
NO_THREAD_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                   void *(*start)(void *), void *arg) {
    static int (*real)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
    const char *refuse = getenv("NO_THREAD_ONCE");
    if (refuse != NULL && unlink(refuse) == 0)
        return EAGAIN;
    if (real == NULL)
        real = dlsym(RTLD_NEXT, "pthread_create");
    return real(thread, attr, start, arg);
}
"""


async def test_a_lookup_that_gets_no_thread_is_asked_again(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        fake_segment: FakeSegment) -> None:
    """The thread an upstream's host name is looked up on cannot be started once (the
    system's task limit reached for a moment): that send fails, and the next looks the
    name up again. The lookup was left asked for good, with nothing asking it: the
    forwarder crashed with a traceback, and every send after it waited on that lookup and
    failed, "no connection within 3s", its events never sent until a restart."""
    shim = preload_shim(tmp_path, "no_thread", NO_THREAD_C)
    refuse, port = tmp_path / "refuse-a-thread", free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                       upstreams=[{"name": "up", "protocol": "segment-http",
                                   "url": f"http://localhost:{fake_segment.port}",
                                   "flush_interval_s": 0.02, "timeout_s": 3}])
    agent = agent_process(cfg, port, env={"LD_PRELOAD": str(shim),
                                          "NO_THREAD_ONCE": str(refuse)}).start()
    refuse.touch()   # the next thread: the lookup of localhost, at the first send
    async with aiohttp.ClientSession() as session, session.post(
            f"{agent.url}/v1/track", json={"type": "track", "event": "e", "userId": "u",
                                           "messageId": "m1"},
            headers={"Authorization": "Basic " + base64.b64encode(b"k:").decode()}) as reply:
        assert reply.status == 200
    await wait_for(lambda: fake_segment.message_ids() == ["m1"], timeout=20)
    assert not refuse.exists()
    assert agent.terminate() == 0
    log = agent.log.read_text()
    assert "can't start new thread" in log and "Traceback" not in log, log


# -- a signal once the stop is done ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="signals")
@pytest.mark.parametrize("late", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
async def test_a_signal_after_the_stop_is_done_leaves_its_exit_clean(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], late: signal.Signals) -> None:
    """A second `kill` (or a reload, or Ctrl-C) that comes once the graceful stop has ended,
    while the process exits: the agent's handlers were gone by then, so a SIGHUP or SIGTERM
    took the signal's default action, the process's end by that signal (not exit 0), and a
    SIGINT ended it as an interrupt (killed by SIGINT, or `outpost: interrupted` and exit
    130), after a stop that had completed."""
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    agent = agent_process(cfg, port)
    offset = await asyncio.to_thread(agent.spawn)
    await asyncio.to_thread(agent.ready, offset)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    with open(agent.log, "rb") as log:
        log.seek(offset)
        said = b""
        deadline = time.monotonic() + 20
        # Looked at every millisecond: the exit that follows the line takes tens of them.
        while b"outpost stopped" not in said and time.monotonic() < deadline:
            said += log.read()
            time.sleep(0.001)
    assert b"outpost stopped" in said, agent.log.read_text()
    agent.proc.send_signal(late)
    code = await exit_code(agent, 20)
    text = agent.log.read_text()
    assert code == 0, (code, text)
    assert "Traceback" not in text and "interrupted" not in text, text


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="signals")
async def test_a_body_that_arrives_during_the_stop_is_stored_and_answered(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """A large post (aiohttp's, not the express lane's) half sent when SIGTERM comes, whose
    rest arrives within the stop's 5 s for the requests being answered: its events are
    stored and it is answered 200. The rest used to be read and dropped once the stop had
    begun, so its route waited the 5 s out for a body that had come, and the app got no
    answer at all: the connection closed, nothing stored."""
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    agent = await asyncio.to_thread(agent_process(cfg, port).start)
    assert agent.proc is not None
    body = json.dumps({"data": [event(i, pad="x" * 200) for i in range(1000)]}).encode()
    assert len(body) > 200_000   # past the express lane's 64 KiB
    half = len(body) // 2
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /app/late/track HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                 .encode() + body[:half])
    await writer.drain()
    agent.proc.send_signal(signal.SIGTERM)

    async def refused() -> bool:   # the stop has begun: nothing new is accepted
        try:
            _, probe = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return True
        probe.close()
        return False
    await wait_for(refused)
    writer.write(body[half:])
    await writer.drain()
    async with asyncio.timeout(20):
        status = await reader.readline()
    writer.close()
    code = await exit_code(agent, 20)
    assert status.startswith(b"HTTP/1.1 200"), (status, agent.log.read_text())
    assert code == 0
    assert read_offline(tmp_path / "spool.db")["depth"] == 1000
