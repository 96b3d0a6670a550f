"""The one bench command: `python -m bench [--quick] [--duration S] ...`.

Phases: (1) ingest: for each HTTP/ws workload, the hello-world ceiling, the
naive baseline and Outpost are each started fresh as a subprocess and loaded
the same way, with each one's CPU per million events (and Outpost again with
its upstream online, for CPU until delivered); (1b) latency: the batch
workloads offered at a fixed rate (open loop), naive and Outpost; (2) backlog: the empty-spool
batch rate, then per drain (an uplink and the family of the events queued for
it) a backlog filled with the upstream offline (the
growing spool), its disk bytes and startup, the drain against the fake
upstream beside that sink's own ceiling, and the refill (space reuse); then the disk
bytes of events posted one at a time (bench/lone.py);
(3) idle: wakeups of an agent with nothing to do. Results: a table on stdout
and JSON in bench/out/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import drain, idle, loadgen, lone, report
from .harness import Harness, wait_empty
from .loadgen import Load
from .meters import CpuWindow, per_million
from .payloads import APP_ID, BASIC_AUTH, body
from .procs import ROOT, Proc, free_port, fsync_latency, read_rss, upstream_proc

# "normal": Outpost with sync = "normal" (no fsync per commit), to show what durability costs.
SERVERS = ("hello", "naive", "normal", "agent")
# Where ingest is also measured with the upstream online: CPU "until delivered".
ONLINE_WORKLOADS = ("batch_nucleus", "batch_segment")
SEGMENT_WORKLOADS = ("single", "batch_segment")   # Segment events, when the routes exist
PHASES = ("ingest", "latency", "backlog", "idle")
LATENCY_WORKLOADS = ("batch_nucleus", "batch_segment")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--backlog", type=int, default=1_000_000,
                   help="events in the growing-spool fill and each drain backlog")
    p.add_argument("--idle", type=float, default=60.0, help="seconds of the idle-wakeups window")
    p.add_argument("--online-uplink", default="segment-http", choices=drain.UPLINKS,
                   help="the upstream of the 'upstream online' ingest rows")
    p.add_argument("--uplinks", default=",".join(drain.DRAINS),
                   help="comma list of the drains: " + ", ".join(drain.DRAINS)
                   + " (the -mapped ones: events of the other family, mapped at ingest)")
    p.add_argument("--open-rate", type=float, default=20_000.0,
                   help="latency phase: events/s offered in 100-event batches on a schedule "
                   "(open loop), below both servers' closed-loop rates")
    p.add_argument("--batch-max-events", type=int, default=0,
                   help="the upstream's batch_max_events in every agent (default: the agent's)")
    p.add_argument("--repeat", type=int, default=1, help="runs per figure; the median is kept")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--only", default=",".join(PHASES),
                   help="comma list of: " + ", ".join(PHASES) + " (drain: same as backlog)")
    p.add_argument("--workloads", default="single,batch_nucleus,batch_segment,ws")
    p.add_argument("--quick", action="store_true",
                   help="3 s runs, 1 s warm-up, 100,000-event backlog, 10 s idle window")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--keep", action="store_true", help="keep the temporary spools")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
        args.backlog, args.idle = min(args.backlog, 100_000), min(args.idle, 10.0)
    args.only = args.only.replace("drain", "backlog")
    unknown = set(args.only.split(",")) - set(PHASES)
    if unknown:
        p.error(f"--only: unknown phase(s) {', '.join(sorted(unknown))}")
    unknown = set(args.uplinks.split(",")) - set(drain.DRAINS) - {""}
    if unknown:
        p.error(f"--uplinks: unknown drain(s) {', '.join(sorted(unknown))}")
    return args


class Bench(Harness):
    """The ingest table's runs, the backlog phase and the idle window."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.server = ""
        self.segment = False

    def start(self, server: str, d: Path, workload: str = "") -> Proc:
        if server in ("agent", "normal"):
            # Its offline upstream speaks the workload's own family, as an app's usually
            # does: events of the other family would be mapped at ingest (measured apart).
            protocol = "segment-http" if self.segment and workload in SEGMENT_WORKLOADS \
                else "nucleus-ws"
            return self.start_agent(d, protocol=protocol,
                                    sync="normal" if server == "normal" else "full")
        return self.start_ref(server, d)

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

    def measure(self, server: str, workload: str, rate: float = 0.0) -> dict[str, Any]:
        """``workload`` on a fresh ``server``: closed loop, or offered at ``rate`` events/s."""
        d = self.dir(f"{server}-{workload}")
        proc = self.start(server, d, workload)
        self.server = server
        try:
            time.sleep(0.5)
            idle_rss = read_rss(proc.pid)
            load = self.load_for(workload, proc.port)
            load.rate = rate
            result = self.loaded(proc, load, d)
            result["rss_idle"], result["rss_anon_idle"] = idle_rss
        finally:
            proc.stop()
            if not self.args.keep:
                shutil.rmtree(d, ignore_errors=True)
        print(f"  {workload:14s} {server:7s} {result['events_per_s']:>11,.0f} ev/s  "
              f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
              f"errors {result['errors']}  anon peak {result['rss_anon_peak'] / 1e6:.1f} MB  "
              f"CPU {_cpu(result['cpu_s_per_m'])} s/M", flush=True)
        return result

    def online(self, workload: str) -> dict[str, Any]:
        """The agent with its upstream online: ingest rate, and CPU per million events over
        the measured load (ingest and the delivery running beside it) and until the queue
        it left is delivered."""
        d = self.dir(f"online-{workload}")
        up_port = free_port()
        upstream = upstream_proc(up_port, d / "upstream.log").start()
        self.server = "online"
        limit = 120.0
        try:
            agent = self.start_agent(d, up_port, self.args.online_uplink)
            try:
                load = self.load_for(workload, agent.port)
                load.duration = self.args.warmup
                loadgen.run(load, d, self.use_wrk, self.args.wrk_threads)
                wait_empty(agent.port, limit)
                load.duration = self.args.duration
                with CpuWindow(agent.pid) as until_delivered:
                    with CpuWindow(agent.pid) as ingest:
                        result = loadgen.run(load, d, self.use_wrk, self.args.wrk_threads)
                    lag, left = wait_empty(agent.port, limit)
            finally:
                agent.stop()
        finally:
            upstream.stop()
            if not self.args.keep:
                shutil.rmtree(d, ignore_errors=True)
        events = float(result["raw"]["events"])
        result.update(uplink=self.args.online_uplink, events=events, delivery_lag_s=lag, left=left,
                      cpu_s_per_m=per_million(ingest.seconds, events),
                      cpu_s_per_m_delivered=per_million(until_delivered.seconds, events))
        print(f"  {workload:14s} online  {result['events_per_s']:>11,.0f} ev/s  "
              f"p99 {result['p99_ms']:7.2f} ms  CPU {_cpu(result['cpu_s_per_m'])} s/M over the load, "
              f"{_cpu(result['cpu_s_per_m_delivered'])} until delivered "
              f"({lag:.1f} s after the load, {left} left)", flush=True)
        return result

    def probe_segment(self) -> bool:
        """Use Segment routes when this checkout has them (another dialect may add them)."""
        d = self.dir("probe")
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
            if workload in ONLINE_WORKLOADS:
                runs["online"] = []
            for _ in range(self.args.repeat):
                for server in runs:
                    runs[server].append(self.online(workload) if server == "online"
                                        else self.measure(server, workload))
            out[workload] = {s: _median(r) for s, r in runs.items()}
        agent = [w["agent"] for w in out.values()]
        if agent:
            self.memory["idle"] = (max(a["rss_idle"] for a in agent),
                                   max(a["rss_anon_idle"] for a in agent))
            self.memory["ingest"] = (max(a["rss_peak"] for a in agent),
                                     max(a["rss_anon_peak"] for a in agent),
                                     max(a["rss_anon_peak"] - a["index_bytes"] for a in agent))
            self.memory["hello_idle_anon"] = min(w["hello"]["rss_anon_idle"] for w in out.values())
        return out

    def latency(self) -> dict[str, Any]:
        """Batch latency at a fixed offered rate (open loop), Outpost and naive alike: what
        a server adds to a request below saturation. At 32 closed-loop connections the
        latency is the queue the connections make (p99 follows the rate, Little's law)."""
        self.segment = self.segment or self.probe_segment()
        rate = self.args.open_rate
        print(f"latency: {rate:,.0f} events/s offered (open loop)", flush=True)
        out: dict[str, Any] = {}
        for workload in LATENCY_WORKLOADS:
            if workload == "batch_segment" and not self.segment:
                continue
            out[workload] = {"offered": rate,
                             **{s: self.measure(s, workload, rate) for s in ("naive", "agent")}}
        return out

    def backlog(self) -> dict[str, Any]:
        """The empty-spool batch rate, then per drain a backlog filled and drained (the first
        of Nucleus events also measures the full-spool rate, the last one the refill)."""
        d = self.dir("empty-spool")
        agent = self.start_agent(d)
        try:
            out: dict[str, Any] = {"empty_spool": self.loaded(
                agent, self.load_for("batch_nucleus", agent.port), d)}
        finally:
            agent.stop()
        print(f"  empty spool: {out['empty_spool']['events_per_s']:,.0f} ev/s, "
              f"CPU {_cpu(out['empty_spool']['cpu_s_per_m'])} s/M", flush=True)
        drains = [u for u in self.args.uplinks.split(",") if u]
        # The full-spool rate is the empty-spool load (Nucleus batches) on the first spool
        # of Nucleus events, so that every drain's queue holds one family.
        full = next((n for n in drains if drain.DRAINS[n][1] == "nucleus"), None)
        for i, name in enumerate(drains):
            out[name] = drain.backlog(self, name, full_rate=name == full,
                                      reuse=i == len(drains) - 1)
        fill = self.memory.get("fill", (0, 0, 0))
        self.peak("ingest", fill[:2], fill[1] - fill[2])
        # Each commit one event (a quiet device's apps): what a record costs alone.
        events = 2_000 if self.args.quick else 10_000
        out["lone"] = {kind: lone.lone(self.dir("lone"), kind, events) for kind in lone.KINDS}
        for kind, r in out["lone"].items():
            print(lone.line(kind, r), flush=True)
        return out


def _cpu(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


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
        if "latency" in phases:
            results["latency"] = bench.latency()
        if "backlog" in phases:
            results["backlog"] = bench.backlog()
        if "idle" in phases:
            results["idle"] = idle.idle(bench, args.idle)
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
