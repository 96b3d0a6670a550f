"""A backlog of large events, drained: `python -m bench.large_drain`.

    python -m bench.large_drain [--only nucleus-ws|segment-http] [--events N]

For each case a fresh `outpost run` (its upstream offline) takes ``N`` large,
incompressible events, posted as apps do (random bytes, base64):

- ``nucleus-ws``: Nucleus events of ~400 KB (8 per `/app/benchapp/track` post), N 200;
- ``segment-http``: Segment track events of ~30 KB (16 per `/v1/batch` post), N 2,000.

Then the fast sink (`python -m bench.upstream`) starts, `POST /flush`, and the drain is
timed until `queue_depth` is 0 (at most ``--timeout`` s): seconds, MB/s of stored event
bytes (the upstream's `queue_bytes` in `/status`, the event bodies as stored), the agent's
CPU seconds and peak RSS during the drain only. Each batch is full in bytes here
(`batch_max_bytes`, 500 KB: one Nucleus event, ~16 Segment events), so this is the path
where a read bounded by event count alone re-read the backlog at every batch (5438aec).

Same-run reference: the agent stopped, the largest request it sent (the sink's `/sample`)
is posted as it is straight to the sink for ``--warmup`` + ``--duration`` s (wrk at one
connection for segment-http, one key's FIFO allowing one request at a time; the Python
websocket client for nucleus-ws, at ``--ws-connections`` connections, default 4 = the
uplink's `max_in_flight` frames). The ratio is drain events/s over ceiling events/s, the
same as drain MB/s over the ceiling's MB/s counted in the same stored bytes per event.
The drain's peak RSS is given against the agent's RSS just after it started (empty spool);
the RSS just before the drain (filled, upstream offline) is printed per case: a forwarder
that holds a read of the backlog while its upstream is down shows there already.

Bounded: every post and wait has a timeout; the scratch directory is removed at the end.
Takes ~20 s against the current agent, ~60 s against one that drains quadratically (f54c18f).
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from . import loadgen
from .harness import wait_empty
from .loadgen import Load
from .meters import CpuWindow
from .payloads import APP_ID, BASIC_AUTH
from .procs import (
    Proc,
    RssSampler,
    agent_proc,
    free_port,
    http_get,
    http_post,
    read_rss,
    upstream_proc,
    write_agent_config,
)

MB = 1e6
# case -> (default N, events per ingest post, random bytes per event before base64)
CASES = {"nucleus-ws": (200, 8, 300_000), "segment-http": (2000, 16, 22_000)}


def _bodies(case: str, n: int, per_post: int, size: int) -> Any:
    """The ingest posts, one at a time: (path, headers, body)."""
    rng = random.Random(17)
    for first in range(0, n, per_post):
        ids = range(first, min(n, first + per_post))
        if case == "nucleus-ws":
            data = [{"type": "event", "name": "blob", "id": i, "sessionId": 1,
                     "data": {"blob": base64.b64encode(rng.randbytes(size)).decode()}}
                    for i in ids]
            yield (f"/app/{APP_ID}/track", {"Content-Type": "application/json"},
                   json.dumps({"data": data}).encode())
        else:
            batch = [{"type": "track", "event": "blob", "userId": "u", "messageId": f"m{i}",
                      "properties": {"blob": base64.b64encode(rng.randbytes(size)).decode()}}
                     for i in ids]
            yield ("/v1/batch", {"Content-Type": "application/json", "Authorization": BASIC_AUTH},
                   json.dumps({"batch": batch}).encode())


def _fill(port: int, case: str, n: int) -> None:
    _, per_post, size = CASES[case]
    for path, headers, body in _bodies(case, n, per_post, size):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()


def _queued(port: int) -> tuple[int, int]:
    """(events, stored bytes) queued for the one upstream, from /status."""
    st = json.loads(http_get(f"http://127.0.0.1:{port}/status", timeout=10.0))
    up = st["upstreams"][0]
    return int(up["queue_depth"]), int(up["queue_bytes"])


def _ceiling(sink: Proc, case: str, d: Path, args: argparse.Namespace) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/sample", timeout=10) as resp:
        sample, events = resp.read(), int(resp.headers["X-Events"])
    if not events:
        return {"events_per_s": 0.0, "note": "the agent sent nothing to sample"}
    body = d / "ceiling-body.json"
    body.write_bytes(sample)
    base = f"127.0.0.1:{sink.port}"
    if case == "segment-http":
        load = Load(f"http://{base}/v1/batch", "segment", events, 1, body_file=body)
    else:
        load = Load(f"ws://{base}/app/{APP_ID}/track", "ws", events, args.ws_connections,
                    body_file=body)
    use_wrk = case == "segment-http" and loadgen.have_wrk()
    load.duration = args.warmup
    loadgen.run(load, d, use_wrk)
    load.duration = args.duration
    with CpuWindow(sink.pid) as cpu:
        r = loadgen.run(load, d, use_wrk)
    seconds = r["raw"]["duration_us"] / 1e6
    return {"events_per_s": r["events_per_s"], "requests_per_s": r["requests_per_s"],
            "events_per_request": events, "request_bytes": len(sample),
            "wire_mb_per_s": r["requests_per_s"] * len(sample) / MB,
            "sink_busy": cpu.seconds / seconds if seconds else 0.0, "errors": r["errors"],
            "generator": r["raw"].get("generator", ""), "connections": load.connections}


def run_case(case: str, n: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    d = work / case
    (d / "spool").mkdir(parents=True)
    port, up_port = free_port(), free_port()
    cfg = write_agent_config(d / "agent.toml", port, d / "spool" / "spool.db", up_port,
                             protocol=case)
    agent = agent_proc(cfg, port, d / "agent.log").start()
    sink = upstream_proc(up_port, d / "upstream.log")
    r: dict[str, Any] = {"case": case, "events": n, "rss_started": read_rss(agent.pid)[0]}
    try:
        _fill(port, case, n)
        r["filled"], r["filled_bytes"] = _queued(port)
        r["rss_before"] = read_rss(agent.pid)[0]
        sink.start()
        with RssSampler(agent.pid) as rss, CpuWindow(agent.pid) as cpu, \
                CpuWindow(sink.pid) as sink_cpu:
            # The agent's own retry may have found the sink while it started: count from here.
            at_start, at_start_bytes = _queued(port)
            http_post(f"http://127.0.0.1:{port}/flush", timeout=10.0)
            elapsed, left = wait_empty(port, args.timeout)
        peak, _ = rss.take()
        got = json.loads(http_get(f"http://127.0.0.1:{up_port}/count", timeout=10.0))
        r.update(depth_at_start=at_start, bytes_at_start=at_start_bytes, seconds=elapsed,
                 left=left, cpu_s=cpu.seconds, sink_cpu_s=sink_cpu.seconds, rss_peak=peak,
                 sink_events=got["events"], sink_requests=got["frames"])
        drained = at_start - left
        r["events_per_s"] = drained / elapsed
        # Bytes drained: those queued at the start, less the share of the events left.
        r["mb_per_s"] = at_start_bytes * drained / max(at_start, 1) / elapsed / MB
        agent.stop()
        r["ceiling"] = _ceiling(sink, case, d, args)
    finally:
        agent.stop()
        sink.stop()
    c = r["ceiling"]
    r["ceiling_mb_per_s"] = c["events_per_s"] * r["bytes_at_start"] / max(r["depth_at_start"], 1) / MB
    r["ratio"] = r["events_per_s"] / c["events_per_s"] if c["events_per_s"] else None
    return r


def _table(results: list[dict[str, Any]]) -> str:
    head = ("| case | events | stored MB | drain s | drain MB/s | agent CPU s (busy) | "
            "peak RSS MB (x started) | sink ceiling MB/s | drain / ceiling |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        c = r["ceiling"]
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        lines.append(
            f"| {r['case']} | {r['depth_at_start']:,}{' (' + str(r['left']) + ' left)' if r['left'] else ''}"
            f" | {r['bytes_at_start'] / MB:.1f} | {r['seconds']:.2f} | {r['mb_per_s']:.1f}"
            f" | {r['cpu_s']:.2f} ({r['cpu_s'] / r['seconds']:.2f})"
            f" | {r['rss_peak'] / MB:.0f} ({r['rss_peak'] / max(r['rss_started'], 1):.2f}x)"
            f" | {r['ceiling_mb_per_s']:.1f} ({c.get('events_per_s', 0):,.0f} ev/s,"
            f" {c.get('connections', '-')} conn, sink busy {c.get('sink_busy', 0):.2f}) | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(CASES), help="one case only")
    p.add_argument("--events", type=int, default=0,
                   help="events per case (default 200 nucleus-ws, 2000 segment-http)")
    p.add_argument("--timeout", type=float, default=300.0, help="drain limit, seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="ceiling warm-up, seconds")
    p.add_argument("--duration", type=float, default=4.0, help="ceiling measured, seconds")
    p.add_argument("--ws-connections", type=int, default=4,
                   help="websocket connections for the nucleus-ws ceiling")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hld-run-"))
    results = []
    try:
        for case in [a.only] if a.only else list(CASES):
            r = run_case(case, a.events or CASES[case][0], work, a)
            print(f"  {case}: {r['depth_at_start']:,} events, {r['bytes_at_start'] / MB:.1f} MB "
                  f"drained in {r['seconds']:.2f} s ({r['left']} left), "
                  f"{r['sink_requests']} requests; RSS {r['rss_started'] / MB:.0f} MB started, "
                  f"{r['rss_before'] / MB:.0f} MB filled, {r['rss_peak'] / MB:.0f} MB drain peak",
                  flush=True)
            results.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(_table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
