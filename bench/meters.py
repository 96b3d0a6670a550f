"""What a process under test spends, read from outside it: CPU, wakeups, spool bytes.

CPU is user+sys of the whole process (every thread, SQLite's included) from
psutil; wakeups are voluntary context switches, summed over the process's
threads from /proc/<pid>/task (psutil's own figure is the main thread's only
on Linux, so both are kept); spool bytes are the spool file plus its -wal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

from .sampling import Sampler


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (all its threads)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def per_million(cpu_s: float, events: float) -> float | None:
    """CPU seconds per million events, or None when nothing was counted."""
    return cpu_s / events * 1e6 if events > 0 else None


class CpuWindow:
    """``with CpuWindow(pid) as cpu: ...`` then ``cpu.seconds``: CPU used inside the block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> CpuWindow:
        self._start = cpu_seconds(self.pid)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.seconds = cpu_seconds(self.pid) - self._start
        except psutil.Error:
            self.seconds = 0.0


def voluntary_switches(pid: int) -> dict[int, int]:
    """Voluntary context switches so far, per thread id (from /proc/<pid>/task/*/status)."""
    out: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    out[int(task.name)] = int(line.split()[1])
        except OSError:
            continue  # the thread ended between the listing and the read
    return out


def switches_between(before: dict[int, int], after: dict[int, int]) -> int:
    """Switches in the window: threads born in it count from zero; threads that ended are lost
    (an idle agent should start none, and the thread counts are reported beside)."""
    return sum(n - before.get(tid, 0) for tid, n in after.items())


def main_thread_switches(pid: int) -> int:
    """psutil's figure: on Linux, the main thread's voluntary switches only."""
    return int(psutil.Process(pid).num_ctx_switches().voluntary)


def spool_bytes(spool: Path) -> int:
    """The spool file plus its write-ahead log, in bytes (0 for a missing file)."""
    return sum(p.stat().st_size for p in (spool, Path(f"{spool}-wal")) if p.exists())


@dataclass
class DiskSampler(Sampler):
    """Samples the spool's bytes (file + -wal) every ``interval`` s in a thread; keeps the peak."""

    spool: Path
    interval: float = 0.1
    peak: int = 0

    def sample(self) -> int:
        try:
            now = spool_bytes(self.spool)
        except OSError:
            return self.peak  # a file rotated away between exists() and stat()
        self.peak = max(self.peak, now)
        return now
