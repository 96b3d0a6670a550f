"""The backlog: fill, disk, startup, drain to one uplink, the sink's own ceiling, space reuse.

For one drain of ``DRAINS`` (an upstream protocol, and the family of the events queued
for it), on a fresh agent with that upstream offline:
1. fill ``--backlog`` events of that family (bench/growing.py: the first and last 10%);
   optionally then the 100-event batch rate with the spool that full;
2. stop it: spool file + -wal bytes per queued event (before the drain);
3. start it three times on the backlog (startup, median);
4. bring the fake upstream (bench/upstream.py) online, ``POST /flush``, and time
   the drain to an empty queue, with the agent's and the sink's CPU;
5. spool bytes after the drain, running and stopped, against the peak;
6. the sink's receive ceiling in the same run: the agent stopped, a load
   generator posts the largest batch the agent sent, as it is, straight to the
   sink (wrk for Segment HTTP, the Python websocket client reading the acks for
   Nucleus) for ``--warmup`` + ``--duration`` s;
7. optionally (``reuse``) fill again as many events with the upstream offline:
   the spool must not grow past its peak so far if the drained space is reused
   (fairest on a backlog that had no full-spool run on top of its fill).
"""

from __future__ import annotations

import json
import statistics
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import growing
from .harness import Harness, depth, index_bytes, wait_empty
from .loadgen import Load
from .meters import CpuWindow, DiskSampler, per_million, spool_bytes
from .payloads import APP_ID, raw_event_bytes
from .procs import Proc, RssSampler, free_port, http_get, http_post, upstream_proc

UPLINKS = ("nucleus-ws", "segment-http")
# name -> (upstream protocol, the events queued for it: bench/payloads.py KINDS). The
# common case is an upstream of the events' own family; the last two map every event to
# the other family, at ingest (docs/architecture.md, "Where mapping happens").
DRAINS = {"nucleus-ws": ("nucleus-ws", "nucleus"), "segment-http": ("segment-http", "segment"),
          "nucleus-ws-mapped": ("nucleus-ws", "segment"),
          "segment-http-mapped": ("segment-http", "nucleus")}


def backlog(h: Harness, name: str, full_rate: bool, reuse: bool) -> dict[str, Any]:
    protocol, kind = DRAINS[name]
    n = h.args.backlog
    d = h.dir(f"drain-{name}")
    spool = d / "spool" / "spool.db"
    up_port = free_port()
    r: dict[str, Any] = {"protocol": protocol, "events": kind, "backlog": n,
                         "raw_bytes_per_event": raw_event_bytes(kind)}
    agent = h.start_agent(d, up_port, protocol)
    r["startup_empty_s"] = agent.ready_s
    upstream = upstream_proc(up_port, d / "upstream.log")
    with DiskSampler(spool) as disk:
        try:
            with RssSampler(agent.pid) as rss:
                r["fill"] = growing.fill(agent.pid, agent.port, n, h.args.connections, d,
                                         h.use_wrk, h.args.wrk_threads, kind)
                h.peak("fill", rss.take(), index_bytes(agent.port, 0))
            disk.sample()
            r["disk_peak_fill"] = disk.peak
            if full_rate:
                r["full_spool"] = h.loaded(agent, _batches(agent.port, h.args.connections), d)
                r["full_spool"]["depth_before"] = r["fill"]["end_depth"]
            r["depth"] = depth(agent.port)
        finally:
            agent.stop()
        r["disk_before"] = spool_bytes(spool)
        r["disk_before_per_event"] = r["disk_before"] / max(r["depth"], 1)
        starts = []
        for i in range(3):
            agent = h.start_agent(d, up_port, protocol)
            starts.append(agent.ready_s)
            if i < 2:
                agent.stop()
        r["startup_backlog_s"], r["startup_runs_s"] = statistics.median(starts), starts
        try:
            try:
                r["drain"] = _drain(h, agent, upstream, r["depth"])
                r["disk_after_running"] = spool_bytes(spool)
            finally:
                agent.stop()
            r["disk_after_stopped"] = spool_bytes(spool)
            r["ceiling"] = _ceiling(h, upstream, protocol, d)
        finally:
            upstream.stop()
    r["disk_peak"] = disk.peak
    if reuse:
        r["reuse"] = _refill(h, d, up_port, protocol, kind, r["disk_peak"])
    print(_line(r), flush=True)
    return r


def _batches(port: int, connections: int) -> Load:
    return Load(f"http://127.0.0.1:{port}/app/{APP_ID}/track", "nucleus", 100, connections)


def _drain(h: Harness, agent: Proc, upstream: Proc, queued: int) -> dict[str, Any]:
    upstream.start()
    limit = max(300.0, queued / 5_000)
    with RssSampler(agent.pid) as rss, CpuWindow(agent.pid) as cpu, CpuWindow(upstream.pid) as up:
        # The agent's own retry may have found the sink while it started: count from here.
        at_start = depth(agent.port)
        http_post(f"http://127.0.0.1:{agent.port}/flush")
        elapsed, left = wait_empty(agent.port, limit)
    h.peak("drain", rss.take(), index_bytes(agent.port))
    got = json.loads(http_get(f"http://127.0.0.1:{upstream.port}/count"))
    drained = at_start - left
    return {"seconds": elapsed, "left": left, "depth_at_start": at_start,
            "events_per_s": drained / elapsed,
            "cpu_s_per_m": per_million(cpu.seconds, drained),
            "upstream_cpu_s_per_m": per_million(up.seconds, drained),
            "upstream_busy": up.seconds / elapsed,
            "upstream_events": got["events"], "upstream_requests": got["frames"],
            "events_per_request": got["events"] / max(got["frames"], 1)}


def _ceiling(h: Harness, upstream: Proc, protocol: str, d: Path) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{upstream.port}/sample", timeout=5) as resp:
        sample, events = resp.read(), int(resp.headers["X-Events"])
    if not events:
        return {"events_per_s": None, "note": "the agent sent nothing to sample"}
    body = d / "ceiling-body.json"
    body.write_bytes(sample)
    base = f"127.0.0.1:{upstream.port}"
    if protocol == "segment-http":
        load = Load(f"http://{base}/v1/batch", "segment", events, h.args.connections, body_file=body)
    else:
        load = Load(f"ws://{base}/app/{APP_ID}/track", "ws", events, h.args.connections,
                    body_file=body)
    result = h.loaded(upstream, load, d)
    # How much of one core the sink used: near 100% it is the ceiling; well under, the load
    # generator (sharing the 2 cores) limited it, and the figure is a floor under the ceiling.
    busy = result["cpu_s"] / (result["raw"]["duration_us"] / 1e6)
    out = {"events_per_s": result["events_per_s"], "events_per_request": events,
           "request_bytes": len(sample), "upstream_cpu_s_per_m": result["cpu_s_per_m"],
           "upstream_busy": busy,
           "errors": result["errors"], "generator": result["raw"].get("generator", "")}
    if protocol == "segment-http":
        # An HTTP uplink has one batch in flight per key (FIFO per key and lane): the sink
        # at one request at a time bounds what a single key's drain can reach.
        one = h.loaded(upstream, replace(load, connections=1), d)
        out["one_at_a_time_events_per_s"] = one["events_per_s"]
        out["one_at_a_time_errors"] = one["errors"]
    return out


def _refill(h: Harness, d: Path, up_port: int, protocol: str, kind: str,
            peak: int) -> dict[str, Any]:
    """Fill the drained spool again with as many events, upstream offline: does the file grow
    past the ``peak`` it reached before (fill and drain)?"""
    spool = d / "spool" / "spool.db"
    before = spool_bytes(spool)
    agent = h.start_agent(d, up_port, protocol)
    try:
        with DiskSampler(spool) as disk:
            fill = growing.fill(agent.pid, agent.port, h.args.backlog, h.args.connections, d,
                                h.use_wrk, h.args.wrk_threads, kind)
            queued = depth(agent.port)
    finally:
        agent.stop()
    after = spool_bytes(spool)
    return {"depth": queued, "disk_start": before, "disk_peak": disk.peak, "disk_stopped": after,
            "first_peak": peak, "peak_over_first_peak": disk.peak / max(peak, 1),
            "events_per_s": fill["events_per_s"]}


def _line(r: dict[str, Any]) -> str:
    f, dr, c = r["fill"], r["drain"], r["ceiling"]
    first, last = f["first_10pct"]["events_per_s"] or 0, f["last_10pct"]["events_per_s"] or 0
    return (f"  {r['protocol']} ({r['events']} events): fill {f['events_per_s']:,.0f} ev/s (first 10% {first:,.0f}, "
            f"last 10% {last:,.0f}); {r['disk_before_per_event']:.0f} B/event; drain "
            f"{r['depth']:,} in {dr['seconds']:.2f} s = {dr['events_per_s']:,.0f} ev/s, sink "
            f"ceiling {c.get('events_per_s') or 0:,.0f} ev/s; disk after "
            f"{r['disk_after_stopped'] / 1e6:.1f} MB of peak {r['disk_peak'] / 1e6:.1f} MB")
