"""The one bench command: `python -m bench [--quick] [--duration S] ...`.

Phases: (1) for each HTTP/ws workload, the hello-world ceiling, the naive
baseline and Outpost are each started fresh as a subprocess and loaded the
same way; (2) a backlog is ingested with the upstream offline, Outpost is
restarted on it (startup time, spool size), then the fake upstream comes
online and the drain is timed. Results: a table on stdout and JSON in bench/out/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import loadgen, report
from .loadgen import Load
from .payloads import APP_ID, BASIC_AUTH, body, raw_event_bytes
from .procs import (
    ROOT,
    Proc,
    RssSampler,
    agent_proc,
    free_port,
    fsync_latency,
    http_get,
    http_post,
    read_rss,
    ref_proc,
    upstream_proc,
    write_agent_config,
)

# "normal": Outpost with sync = "normal" (no fsync per commit), to show what durability costs.
SERVERS = ("hello", "naive", "normal", "agent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--backlog", type=int, default=1_000_000, help="events in the drain backlog")
    p.add_argument("--repeat", type=int, default=1, help="runs per figure; the median is kept")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--only", default="ingest,drain", help="comma list of: ingest, drain")
    p.add_argument("--workloads", default="single,batch_nucleus,batch_segment,ws")
    p.add_argument("--quick", action="store_true",
                   help="3 s runs, 1 s warm-up, 100,000-event backlog")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--keep", action="store_true", help="keep the temporary spools")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.backlog = 3.0, 1.0, min(args.backlog, 100_000)
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and loadgen.have_wrk())
        if args.loadgen == "wrk" and not loadgen.have_wrk():
            raise SystemExit("wrk is not installed (apt-get install wrk), or use --loadgen python")
        self.runs = 0
        self.server = ""
        self.segment = False
        self.memory: dict[str, Any] = {}

    def _dir(self, name: str) -> Path:
        self.runs += 1
        d = self.workdir / f"{self.runs:02d}-{name}"
        d.mkdir()
        return d

    def start(self, server: str, d: Path, upstream_port: int = 0) -> Proc:
        port = free_port()
        if server in ("agent", "normal"):
            cfg = write_agent_config(d / "agent.toml", port, d / "spool.db",
                                     upstream_port or free_port(),
                                     sync="normal" if server == "normal" else "full")
            return agent_proc(cfg, port, d / "agent.log").start()
        return ref_proc(server, port, d / f"{server}.log", d / "naive.db").start()

    def load_for(self, workload: str, port: int) -> Load:
        a, base = self.args, f"127.0.0.1:{port}"
        nucleus = f"http://{base}/app/{APP_ID}/track"
        if workload == "single":
            if self.segment:
                return Load(f"http://{base}/v1/track", "segment1", 1, a.connections)
            return Load(nucleus, "nucleus", 1, a.connections)
        if workload == "batch_nucleus":
            return Load(nucleus, "nucleus", 100, a.connections)
        if workload == "batch_segment":
            return Load(f"http://{base}/v1/batch", "segment", 100, a.connections)
        return Load(f"ws://{base}/app/{APP_ID}/track", "ws", 100, a.connections,
                    any_reply=self.server == "hello")

    def measure(self, server: str, workload: str) -> dict[str, Any]:
        d = self._dir(f"{server}-{workload}")
        proc = self.start(server, d)
        self.server = server
        try:
            time.sleep(0.5)
            idle = read_rss(proc.pid)
            load = self.load_for(workload, proc.port)
            with RssSampler(proc.pid) as rss:
                load.duration = self.args.warmup
                loadgen.run(load, d, self.use_wrk, self.args.wrk_threads)
                rss.take()
                load.duration = self.args.duration
                result = loadgen.run(load, d, self.use_wrk, self.args.wrk_threads)
                result["rss_peak"], result["rss_anon_peak"] = rss.take()
            result["rss_idle"], result["rss_anon_idle"] = idle
        finally:
            proc.stop()
            if not self.args.keep:
                shutil.rmtree(d, ignore_errors=True)
        print(f"  {workload:14s} {server:7s} {result['events_per_s']:>11,.0f} ev/s  "
              f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
              f"errors {result['errors']}  anon peak {result['rss_anon_peak'] / 1e6:.1f} MB",
              flush=True)
        return result

    def probe_segment(self) -> bool:
        """Use Segment routes when this checkout has them (another dialect may add them)."""
        d = self._dir("probe")
        proc = self.start("agent", d)
        try:
            import urllib.request
            req = urllib.request.Request(
                f"http://127.0.0.1:{proc.port}/v1/batch", data=body("segment", 1, 1, 1),
                headers={"Content-Type": "application/json", "Authorization": BASIC_AUTH})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False
        finally:
            proc.stop()
            shutil.rmtree(d, ignore_errors=True)

    def ingest(self) -> dict[str, Any]:
        self.segment = self.probe_segment()
        print(f"Segment routes: {'present' if self.segment else 'absent (Nucleus HTTP used)'}; "
              f"load generator: {'wrk' if self.use_wrk else 'python'}", flush=True)
        wanted = [w for w in self.args.workloads.split(",") if w]
        if not self.segment and "batch_segment" in wanted:
            wanted.remove("batch_segment")
        out: dict[str, Any] = {}
        for workload in wanted:
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SERVERS}
            for _ in range(self.args.repeat):
                for server in SERVERS:
                    runs[server].append(self.measure(server, workload))
            out[workload] = {s: _median(r) for s, r in runs.items()}
        agent = [w["agent"] for w in out.values()]
        if agent:
            self.memory["idle"] = (max(a["rss_idle"] for a in agent),
                                   max(a["rss_anon_idle"] for a in agent))
            self.memory["ingest"] = (max(a["rss_peak"] for a in agent),
                                     max(a["rss_anon_peak"] for a in agent))
            self.memory["hello_idle_anon"] = min(w["hello"]["rss_anon_idle"] for w in out.values())
        return out

    def drain(self) -> dict[str, Any]:
        n = self.args.backlog
        d = self._dir("drain")
        up_port = free_port()
        result: dict[str, Any] = {"backlog": n}
        agent = self.start("agent", d, up_port)
        result["startup_empty_s"] = agent.ready_s
        try:
            with RssSampler(agent.pid) as rss:
                fill = loadgen.run(Load(f"http://127.0.0.1:{agent.port}/app/{APP_ID}/track",
                                        "nucleus", 100, 8, duration=600, max_requests=n // 100),
                                   d, use_wrk=False)
                result["fill_events_per_s"] = fill["events_per_s"]
                fill_peak = rss.take()
            depth = json.loads(http_get(f"http://127.0.0.1:{agent.port}/healthz"))["queue_depth"]
            result["depth"] = depth
            print(f"  backlog: {depth:,} events stored at {fill['events_per_s']:,.0f} ev/s "
                  f"(python client, 8 connections)", flush=True)
        finally:
            agent.stop()
        files = [d / "spool.db", d / "spool.db-wal", d / "spool.db-shm"]
        result["spool_bytes"] = sum(f.stat().st_size for f in files if f.exists())
        result["spool_bytes_per_event"] = result["spool_bytes"] / max(depth, 1)
        result["raw_bytes_per_event"] = raw_event_bytes()
        starts = []
        for _ in range(3):
            agent = self.start("agent", d, up_port)
            starts.append(agent.ready_s)
            if len(starts) < 3:
                agent.stop()
        result["startup_backlog_s"] = statistics.median(starts)
        result["startup_runs_s"] = starts
        upstream = upstream_proc(up_port, d / "upstream.log")
        try:
            time.sleep(1.0)
            idle_backlog = read_rss(agent.pid)
            with RssSampler(agent.pid) as rss:
                upstream.start()
                started = time.perf_counter()
                http_post(f"http://127.0.0.1:{agent.port}/flush")
                deadline = started + max(300.0, n / 5_000)
                while time.perf_counter() < deadline:
                    left = json.loads(http_get(f"http://127.0.0.1:{agent.port}/healthz"))
                    if left["queue_depth"] == 0:
                        break
                    time.sleep(0.05)
                elapsed = time.perf_counter() - started
                drain_peak = rss.take()
            sent = json.loads(http_get(f"http://127.0.0.1:{upstream.port}/count"))["events"]
        finally:
            agent.stop()
            upstream.stop()
            if not self.args.keep:
                shutil.rmtree(d, ignore_errors=True)
        result.update(events_per_s=depth / elapsed, seconds=elapsed, upstream_received=sent,
                      left=left["queue_depth"])
        self.memory["fill"] = fill_peak
        self.memory["idle_backlog"] = idle_backlog
        self.memory["drain"] = drain_peak
        prev = self.memory.get("ingest", (0, 0))
        self.memory["ingest"] = (max(prev[0], fill_peak[0]), max(prev[1], fill_peak[1]))
        print(f"  drain: {depth:,} events in {elapsed:.2f} s = {result['events_per_s']:,.0f} ev/s; "
              f"upstream got {sent:,}; startup {result['startup_backlog_s']:.2f} s "
              f"(empty {result['startup_empty_s']:.2f} s); anon peak {drain_peak[1] / 1e6:.1f} MB",
              flush=True)
        return result


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median events/s (keeps its latencies together)."""
    ranked = sorted(runs, key=lambda r: r["events_per_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["all_events_per_s"] = [r["events_per_s"] for r in runs]
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=args.out))
    bench = Bench(args, workdir)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": report.machine(workdir),
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    results["machine"]["fsync_4k"] = fsync_latency(workdir)
    print(f"outpost bench: {results['machine']}", flush=True)
    phases = args.only.split(",")
    try:
        if "ingest" in phases:
            results["ingest"] = bench.ingest()
        if "drain" in phases:
            results["drain"] = bench.drain()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["memory"] = bench.memory
    results["load_generator"] = "wrk" if bench.use_wrk else "python"
    print()
    print(report.table(results))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for name in (f"results-{stamp}.json", "latest.json"):
        (args.out / name).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nJSON: {args.out / f'results-{stamp}.json'}")
    return 0
