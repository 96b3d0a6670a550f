"""Shared fixtures: config files in tmp_path, an in-process agent, agent subprocesses."""

from __future__ import annotations

import asyncio
import compileall
import fcntl
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from agent import config as config_mod
from agent import logs
from agent.clock import CLOCK, Clock
from agent.forwarder.backoff import Backoff
from agent.forwarder.supervisor import Seams
from agent.service import Agent
from agent.sync.power import BatterySensor, read_battery
from tests.fakes.faulty_upstream import FaultyUpstream
from tests.fakes.nm_bus import FakeNetworkManager, PrivateBus
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags known to work as root in a container; a fresh profile per run.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--force-device-scale-factor=1"]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return str(v)


def write_config(path: Path, spool: Path, *, port: int = 0, listen: dict[str, Any] | None = None,
                 storage: dict[str, Any] | None = None,
                 upstreams: list[dict[str, Any]] | None = None,
                 sync: dict[str, Any] | None = None) -> Path:
    """Write an agent.toml; tables as dicts, upstreams as a list of dicts."""
    lines = ["[listen]", f"port = {port}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in (listen or {}).items()]
    lines += ["[storage]", f"path = {toml_value(str(spool))}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in (storage or {}).items()]
    if sync:
        lines += ["[sync]", *(f"{k} = {toml_value(v)}" for k, v in sync.items())]
    for up in upstreams or []:
        lines.append("[[upstream]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in up.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _ram_temproot() -> str | None:
    """/dev/shm, where it is a RAM filesystem this process may write to, execute from (tests
    run scripts they write) and fill with a run's files; else None (the system's temp dir)."""
    shm = "/dev/shm"
    try:
        fs = os.statvfs(shm)
    except OSError:
        return None
    if fs.f_flag & (os.ST_RDONLY | os.ST_NOEXEC) or not os.access(shm, os.W_OK | os.X_OK):
        return None
    return shm if fs.f_bavail * fs.f_frsize >= 4 << 30 else None


# tmp_path on a RAM filesystem: the spools stay real SQLite files, but each commit's fsync no
# longer waits on a disk that other work on the machine keeps busy (alternated runs of the
# same files: 115 spool-heavy tests 9.5-18.0 s under /tmp, 8.5-9.4 s here; 138 slower ones
# 46.8-52.3 s, 46.3-47.7 s).
# PYTEST_DEBUG_TEMPROOT is pytest's own setting for where tmp_path's tree goes, read at the
# first tmp_path; one set by the user wins.
if "PYTEST_DEBUG_TEMPROOT" not in os.environ and (_shm := _ram_temproot()) is not None:
    os.environ["PYTEST_DEBUG_TEMPROOT"] = _shm
# The same place for the scratch directories of tests that cannot take tmp_path (hypothesis
# state machines, one directory an example): ``tempfile.mkdtemp(dir=SCRATCH)``.
SCRATCH = os.environ.get("PYTEST_DEBUG_TEMPROOT") or None
# The runner's own proxy (a developer's shell, a CI host behind one) is for the internet: the
# agents the tests start read it (agent/uplinks/proxy.py), so an upstream named by a test's own
# host name went to it, and so did the tests' clients (urllib, requests) to 127.0.0.1. The
# tests that want a proxy set their own (test_proxy.py).
for _name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
              "no_proxy", "NO_PROXY"):
    os.environ.pop(_name, None)


_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_PORTS = random.Random()   # seeded by the OS: concurrent test runs draw different ports
_given: set[int] = set()


# Every test process on the machine locks, in this one file, the byte at each port it
# was given, for as long as it runs: the kernel lets the locks go when it exits.
# One file a user: another user's file, made 0644 by its umask, could not be opened here.
_RESERVED = Path(tempfile.gettempdir()) / f"outpost-test-ports-{os.getuid()}.lock"
_reserved_fd: int | None = None


def _reserve(port: int) -> bool:
    """Whether ``port`` is now this process's: no other test process holds it. A port
    free when drawn may be another's all the same, between a kill -9 and its restart
    (test_crash), whose apps then sent their events to this process's agent."""
    global _reserved_fd
    if _reserved_fd is None:
        # Never closed: closing any descriptor of the file drops all this process's locks.
        _reserved_fd = os.open(_RESERVED, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(_reserved_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)
    except OSError:
        return False
    return True


def free_port() -> int:
    """A port free now, for an agent started later (a subprocess binds it a second or so
    on). Drawn below the kernel's ephemeral range on Linux, from which every port-0 bind
    and outgoing connection on the machine takes its port, so none of those takes it in
    that second; never the same one twice in a run, nor one another test process on the
    machine was given and still runs with (``_reserve``)."""
    low = int(_EPHEMERAL.read_text().split()[0]) if _EPHEMERAL.exists() else 0
    if low > 11_000:
        for _ in range(1000):
            port = _PORTS.randrange(10_000, low)
            if port in _given:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            if not _reserve(port):
                continue
            _given.add(port)
            return port
    with socket.socket() as s:   # elsewhere: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A test's report with its captured output as UTF-8: pytest-xdist's workers send each
    report to the controller as UTF-8, which a lone surrogate cannot be. Tests feed the agent
    bytes that are not UTF-8, which it reads with surrogateescape and logs (its own log
    escapes them on the way out), and a captured line carried one into the report: the
    worker stopped with an internal error, ending the run."""
    report: pytest.TestReport = yield
    report.sections = [(title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
                       for title, text in report.sections]
    return report


@pytest.fixture(scope="session", autouse=True)
def compiled_agent() -> None:
    """The agent's modules compiled to bytecode once a run, as installing it compiles them.
    Where PYTHONDONTWRITEBYTECODE is set (this project's machines), every ``python -m agent``
    a test starts (about 400 a run) compiled its modules again, 0.1-0.2 s of CPU each;
    bench/procs.py ``compile_agent`` does the same for the bench. Files already compiled are
    only stat'ed."""
    compileall.compile_dir(ROOT / "agent", quiet=2)


@pytest.fixture(autouse=True)
def fresh_log_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keys registered for redaction by one test's agent must not leak into the next."""
    monkeypatch.setattr(logs, "_registry", logs.SecretRegistry())
    # Nor may one test's rate-limited log line (once a minute) silence the next test's.
    monkeypatch.setattr(logs, "_default_limiter", logs.RateLimiter())
    # Nor a test's setup_logging the next tests' root logger: left at info, every later
    # test's caplog saw the agent's info lines (one naming a tmp_path that held "refused").
    root = logging.getLogger()
    level, installed = root.level, logs._installed
    yield
    if logs._installed is not installed and logs._installed is not None:
        root.removeHandler(logs._installed)
        logs._installed.close()
        logs._installed = installed
    root.setLevel(level)


@pytest.fixture
async def fake_nucleus() -> AsyncIterator[FakeNucleus]:
    fake = await FakeNucleus().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def fake_segment() -> AsyncIterator[FakeSegment]:
    fake = await FakeSegment().start()
    yield fake
    await fake.stop()


# Retries in milliseconds: for tests about what is sent, not how long it waits.
FAST_BACKOFF = Backoff(base_s=0.02, cap_s=0.2)


@pytest.fixture
def fast_backoff() -> Seams:
    """The forwarder seams with FAST_BACKOFF: ``make_agent`` builds with these by default in a
    test that asks for this fixture (directly or through ``faulty``)."""
    return Seams(backoff=FAST_BACKOFF)


@pytest.fixture
async def faulty(fast_backoff: Seams) -> AsyncIterator[FaultyUpstream]:
    """A scripted, misbehaving upstream (tests/fakes/faulty_upstream.py)."""
    fake = await FaultyUpstream().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def make_agent(tmp_path: Path,
                     request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Any]]:
    """Start an in-process agent on port 0: ``agent = await make_agent(upstreams=[...])``;
    ``seams=`` replaces the forwarder's uplink factory, clock or backoff; ``battery=`` the
    battery sensor (agent/sync/power.py)."""
    started: list[Agent] = []
    default = (request.getfixturevalue("fast_backoff") if "fast_backoff" in request.fixturenames
               else Seams())

    async def make(*, seams: Seams = default, battery: BatterySensor = read_battery,
                   **kw: Any) -> Agent:
        cfg_path = write_config(tmp_path / f"agent{len(started)}.toml",
                                kw.pop("spool", tmp_path / "spool.db"), **kw)
        agent = Agent(config_mod.load_file(cfg_path), str(cfg_path), seams=seams, battery=battery)
        await agent.start()
        started.append(agent)
        return agent

    yield make
    for agent in started:
        await agent.stop()


def exited(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """``proc.wait(timeout)``, woken by the exit itself: Popen.wait with a timeout polls,
    sleeping up to 50 ms between looks (25 ms lost a stop on average); a pidfd is readable
    once the process has exited."""
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:   # reaped already (or a kernel without pidfds)
        return proc.wait(timeout)
    try:
        readable = select.poll()   # not select.select: no limit on the fd's number
        readable.register(fd, select.POLLIN)
        if not readable.poll(timeout * 1000):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(fd)
    return proc.wait(timeout)


class AgentProcess:
    """``python -m agent run`` as a real subprocess, for restart and kill -9 tests."""

    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None,
                 prefix: Sequence[str] = (), by_lookup: bool = False) -> None:
        self.config = config
        self.port = port
        self.env = env
        self.preexec_fn = preexec_fn  # e.g. to give the agent its own fd limit
        self.prefix = list(prefix)  # a command the agent runs under (strace, say)
        # Found as ./agent.toml, from the config's directory, rather than named by --config.
        self.by_lookup = by_lookup
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.with_suffix(".log")

    def spawn(self) -> int:
        """Start the process without waiting for it; where its new output begins in the log
        (appended to across restarts)."""
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        offset = self.log.stat().st_size if self.log.exists() else 0
        named = [] if self.by_lookup else ["--config", str(self.config)]
        if self.by_lookup:
            env.pop("OUTPOST_CONFIG", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "agent", "run",
                                          *named],
                                         cwd=self.config.parent if self.by_lookup else ROOT,
                                         env=env, stdout=log, stderr=subprocess.STDOUT,
                                         # Tests pass setrlimit only: nothing lock-taking.
                                         preexec_fn=self.preexec_fn)  # noqa: PLW1509
        return offset

    def start(self, timeout: float = 15.0) -> AgentProcess:
        return self.ready(self.spawn(), timeout)

    def ready(self, offset: int, timeout: float = 15.0) -> AgentProcess:
        """Wait for the process ``spawn`` started to listen; ``offset`` is where its output
        began (the banner is looked for only in new output)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        banner = re.compile(rf"listening on \S+:{self.port}\b".encode())
        with open(self.log, "rb") as log:
            log.seek(offset)
            fresh = b""
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agent exited {self.proc.returncode}:\n"
                                       f"{self.log.read_text()}")
                fresh += log.read()
                if banner.search(fresh):
                    return self
                # Looked at every 10 ms, reading only what is new: a look every 50 ms
                # lost 25 ms of each start on average.
                time.sleep(0.01)
        raise TimeoutError(f"agent did not start:\n{self.log.read_text()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        exited(self.proc, 10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return exited(self.proc, timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: ``agent_process(config_path, port)``; every process is killed at the end."""
    procs: list[AgentProcess] = []

    def make(config: Path, port: int, env: dict[str, str] | None = None,
             preexec_fn: Callable[[], None] | None = None,
             prefix: Sequence[str] = (), by_lookup: bool = False) -> AgentProcess:
        p = AgentProcess(config, port, env, preexec_fn, prefix, by_lookup)
        procs.append(p)
        return p

    yield make
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            exited(p.proc, 10)


@pytest.fixture
def chromium() -> str:
    """The browser binary for tests that load pages in a real browser."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, and CI must run the browser tests")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return CHROMIUM


async def run_chromium(binary: str, profile: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def skip_unless_installable(system: bool) -> None:
    """Skip a test that installs a service from this checkout where Outpost refuses to:
    a clone (interpreter or package) under /tmp, or under a home directory for a system
    service. That refusal has tests of its own (test_operator_mistakes.py)."""
    import agent

    roots = ["/tmp", "/var/tmp"] + (["/home", "/root", str(Path.home())] if system else [])
    for path in (os.path.abspath(sys.executable), str(Path(agent.__file__).parent)):
        for root in roots:
            if PurePosixPath(path).is_relative_to(root):
                pytest.skip(f"this checkout is under {root}, where Outpost refuses to install "
                            "a service from")


@pytest.fixture
def clock() -> Iterator[Clock]:
    """The agent's clock (agent/clock.py), for tests that shift it; reset afterwards."""
    yield CLOCK
    CLOCK.wall_shift_ms = CLOCK.passed_ms = 0


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket for NOTIFY_SOCKET (sd_notify), and its path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[PrivateBus]:
    """A private dbus-daemon, for the sync tests' fake services."""
    private = PrivateBus(tmp_path).start()
    yield private
    private.stop()


@pytest.fixture
async def nm(bus: PrivateBus) -> AsyncIterator[FakeNetworkManager]:
    """A fake NetworkManager on ``bus`` that says the network is not metered."""
    service = await FakeNetworkManager(bus.address, metered=2).start()   # NMMetered NO
    yield service
    await service.stop()
