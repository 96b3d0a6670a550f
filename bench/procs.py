"""Processes under test: start, wait until listening, sample memory, stop."""

from __future__ import annotations

import compileall
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .sampling import Sampler

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_agent_config(path: Path, port: int, spool: Path, upstream_port: int,
                       protocol: str = "nucleus-ws", sync: str = "full",
                       upstream_extra: str = "") -> Path:
    """The agent's config; ``upstream_extra`` is appended to its [[upstream]] table."""
    scheme = "ws" if protocol == "nucleus-ws" else "http"
    path.write_text(f"""[listen]
host = "127.0.0.1"
port = {port}

[storage]
path = "{spool}"
sync = "{sync}"
max_size_mb = 16384

[log]
level = "warning"

[[upstream]]
name = "bench"
protocol = "{protocol}"
url = "{scheme}://127.0.0.1:{upstream_port}"
keys = ["*"]
{upstream_extra}""")
    return path


def http_get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return bytes(resp.read())


def http_post(url: str, timeout: float = 2.0) -> bytes:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return bytes(resp.read())


@dataclass
class Proc:
    """A server subprocess; ``ready_s`` is the time from spawn to its first answer."""

    argv: list[str]
    port: int
    log: Path
    probe: str = "/"
    proc: subprocess.Popen[bytes] | None = None
    ready_s: float = 0.0

    def start(self, timeout: float = 30.0) -> Proc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            started = time.perf_counter()
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited {self.proc.returncode}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                http_get(f"http://127.0.0.1:{self.port}{self.probe}", timeout=1.0)
                self.ready_s = time.perf_counter() - started
                return self
            except OSError:
                time.sleep(0.005)
        self.stop()
        raise TimeoutError(f"{self.argv} did not answer within {timeout}s:\n"
                           f"{self.log.read_text()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


AGENT_PROBE = "/healthz"  # what only an agent answers: it tells agents from reference servers


def agent_proc(config: Path, port: int, log: Path) -> Proc:
    """``outpost run`` from this checkout, its modules compiled to bytecode first."""
    compile_agent()
    return Proc([sys.executable, "-m", "agent", "run", "--config", str(config)], port, log,
                probe=AGENT_PROBE)


def compile_agent() -> None:
    """Compile the agent's modules, as installing it does (pip, a distribution's package).

    Under PYTHONDONTWRITEBYTECODE=1 (set where the bench has run) a checkout compiles its
    ~110 modules again at every start: 0.15-0.3 s of each startup figure on the 2-core
    machine, a cost no installed agent pays. Files already compiled are only stat'ed."""
    compileall.compile_dir(ROOT / "agent", quiet=1)


def ref_proc(kind: str, port: int, log: Path, db: Path | None = None) -> Proc:
    argv = [sys.executable, "-m", "bench.refservers", kind, "--port", str(port)]
    if db is not None:
        argv += ["--db", str(db)]
    return Proc(argv, port, log, probe="/")


def upstream_proc(port: int, log: Path) -> Proc:
    return Proc([sys.executable, "-m", "bench.upstream", "--port", str(port)], port, log,
                probe="/count")


def fsync_latency(directory: Path, n: int = 200) -> dict[str, float]:
    """fdatasync of a 4 KB append in ``directory``, in ms: the floor under every commit."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    times = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return {"p50_ms": times[n // 2], "p99_ms": times[int(n * 0.99)]}


def ingested(port: int) -> int:
    """An agent's count of new events committed (/status)."""
    status = json.loads(http_get(f"http://127.0.0.1:{port}/status", timeout=30.0))
    return int(status["counters"]["ingested"])


def read_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes, from /proc/<pid>/status."""
    rss, anon, _ = _status(pid)
    return rss, anon


def high_water(pid: int) -> int:
    """The highest VmRSS since the process started or ``reset_peak`` (0 once it is gone)."""
    return _status(pid)[2]


def _status(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, VmHWM) in bytes, from /proc/<pid>/status (zeros once it is gone)."""
    found = {"VmRSS:": 0, "RssAnon:": 0, "VmHWM:": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = line.split(None, 1)[0]
                if name in found:
                    found[name] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found["VmRSS:"], found["RssAnon:"], found["VmHWM:"]


def reset_peak(pid: int) -> None:
    """Start the kernel's high-water mark (VmHWM) over from the RSS now."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass   # gone, or not ours: the samples alone


@dataclass
class RssSampler(Sampler):
    """A process's RSS peaks: ``take()`` returns and resets them. Besides a sample every
    ``interval`` s, the kernel's high-water mark, which sees a peak that came and went
    between two samples (a set's table rebuilt while the GIL is held, say: no thread of the
    process, nor one outside it at a 50 ms pace, is sure to see it). The anonymous peak is
    that mark less the file-backed pages now (they barely move)."""

    pid: int
    interval: float = 0.05
    peak_rss: int = 0
    peak_anon: int = 0
    # A sample read before take() resets the mark must not land after it.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        reset_peak(self.pid)

    def sample(self) -> None:
        with self._lock:
            rss, anon, high = _status(self.pid)
            self.peak_rss = max(self.peak_rss, rss, high)
            self.peak_anon = max(self.peak_anon, anon, high - (rss - anon) if high else 0)

    def take(self) -> tuple[int, int]:
        self.sample()
        with self._lock:
            peaks = (self.peak_rss, self.peak_anon)
            self.peak_rss = self.peak_anon = 0
            reset_peak(self.pid)
        return peaks
