"""What every phase of the bench shares: the run's settings, its directories, starting the
servers under test, and one loaded measurement (warm-up, then a timed run with CPU and RSS)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from . import index_memory, loadgen
from .loadgen import Load
from .meters import CpuWindow, per_million
from .procs import (
    AGENT_PROBE,
    Proc,
    RssSampler,
    agent_proc,
    free_port,
    http_get,
    ingested,
    ref_proc,
    write_agent_config,
)

MAX_KEYS = 1_000_000  # storage.dedupe_max_keys' default: the bench's agents keep it


class Harness:
    """The run's settings and work directory; starts agents and reference servers."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and loadgen.have_wrk())
        if args.loadgen == "wrk" and not loadgen.have_wrk():
            raise SystemExit("wrk is not installed (apt-get install wrk), or use --loadgen python")
        self.runs = 0
        self.memory: dict[str, Any] = {}

    def dir(self, name: str) -> Path:
        self.runs += 1
        d = self.workdir / f"{self.runs:02d}-{name}"
        d.mkdir()
        return d

    def peak(self, phase: str, rss: tuple[int, int], index: int = 0) -> None:
        """Keep the highest (VmRSS, RssAnon, RssAnon beyond the agent's dedupe index of
        ``index`` bytes) seen in ``phase`` (idle, ingest, fill, drain)."""
        old = self.memory.get(phase, (0, 0, 0))
        self.memory[phase] = (max(old[0], rss[0]), max(old[1], rss[1]),
                              max(old[2], rss[1] - index))

    def start_agent(self, d: Path, upstream_port: int = 0, protocol: str = "nucleus-ws",
                    sync: str = "full") -> Proc:
        """An agent whose spool lives in ``d/spool/spool.db``; its upstream offline unless
        something listens on ``upstream_port``."""
        (d / "spool").mkdir(exist_ok=True)
        port = free_port()
        extra = "".join(f"{name} = {value}\n" for name, value in
                        (("batch_max_events", self.args.batch_max_events),) if value)
        cfg = write_agent_config(d / "agent.toml", port, d / "spool" / "spool.db",
                                 upstream_port or free_port(), protocol=protocol, sync=sync,
                                 upstream_extra=extra)
        return agent_proc(cfg, port, d / "agent.log").start()

    def start_ref(self, kind: str, d: Path) -> Proc:
        return ref_proc(kind, free_port(), d / f"{kind}.log", d / "naive.db").start()

    def loaded(self, proc: Proc, load: Load, d: Path) -> dict[str, Any]:
        """``--warmup`` s of ``load``, then ``--duration`` s measured: events/s, latency, the
        server's CPU seconds per million events over the measured run, and its RSS peak."""
        with RssSampler(proc.pid) as rss:
            load.duration = self.args.warmup
            loadgen.run(load, d, self.use_wrk, self.args.wrk_threads)
            rss.take()
            keys_from = ingested(proc.port) if proc.probe == AGENT_PROBE else 0
            load.duration = self.args.duration
            with CpuWindow(proc.pid) as cpu:
                result = loadgen.run(load, d, self.use_wrk, self.args.wrk_threads)
            result["rss_peak"], result["rss_anon_peak"] = rss.take()
        events = float(result["raw"]["events"])
        result["index_bytes"] = index_bytes(proc.port, keys_from) if proc.probe == AGENT_PROBE else 0
        result.update(cpu_s=cpu.seconds, events=events, cpu_s_per_m=per_million(cpu.seconds, events))
        return result


def index_bytes(port: int, keys_from: int | None = None) -> int:
    """The agent's dedupe index at its largest since it held ``keys_from`` keys (None: as
    a start rebuilt it, no key arriving since), by bench/index_memory.py, from the events
    its spool ever stored: every bench event is new. Read at the end of a phase: a peak of
    RSS reached earlier in the phase is judged beside an index at least as large as the one
    it held then."""
    keys_to = ingested(port)
    if keys_from is None:   # the newest keys up to the cap, loaded into a new set
        keys_from = keys_to = min(keys_to, MAX_KEYS)
    return index_memory.index_bytes(keys_from, keys_to, MAX_KEYS)


def depth(port: int) -> int:
    return int(json.loads(http_get(f"http://127.0.0.1:{port}/healthz", timeout=5.0))["queue_depth"])


def wait_empty(port: int, limit_s: float) -> tuple[float, int]:
    """Poll /healthz until the queue is empty or ``limit_s`` passes: (seconds, depth left)."""
    started = time.perf_counter()
    left = depth(port)
    while left and time.perf_counter() - started < limit_s:
        time.sleep(0.02)
        left = depth(port)
    return time.perf_counter() - started, left
