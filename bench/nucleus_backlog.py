"""`python -m bench.nucleus_backlog`: a Nucleus module's whole queue in one websocket message.

Modules send their whole, uncapped queue in one message every tick; after the agent was
away it can be many MiB. For each scenario a fresh `outpost run` (upstream offline: pure
ingest) takes large messages of nucleus-nodejs-like events (about 550 bytes each) while a
thread samples VmRSS and RssAnon every 2 ms and a process of its own probes GET /healthz
back to back (a thread would wait for this one's GIL while it writes 30 MB messages).
Reported: idle and peak RssAnon and VmRSS, the time to the reply, events acknowledged,
/healthz p99 and max.

Scenarios: `one-6mb` (11,000 events, 5.9 MB, the audit's repro), `one-30mb` (56,000
events), `one-30mb-ids10k` (the same with ids 1..10000, as nucleus-python draws them:
each id repeats through the queue, so up to 4 MiB of events are kept), `four-30mb` (four
30 MB messages at once on four connections: the in-flight budget admits one at a time,
the others are closed 1013), `drain-30mb` (a module's loop: the queue resent, minus what
was acknowledged, until empty).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from .procs import RssSampler, agent_proc, free_port, read_rss, write_agent_config

MB = 1024 * 1024
KEY = "benchapp"


def queue(n: int, seed: int, ids: int = 1_000_000) -> list[dict[str, Any]]:
    """``n`` events as nucleus-nodejs queues them (ids 1..1e6, collisions and all; 1..10000
    as nucleus-python draws them: then each id repeats through a long queue)."""
    rng = random.Random(seed)
    return [{"type": "event", "name": f"evt-{i}", "date": "2026-12-01T08:00:00.000Z",
             "appId": KEY, "id": rng.randint(1, ids), "userId": None,
             "machineId": "m" * 64, "sessionId": seed, "payload": {"i": i, "label": "x" * 300}}
            for i in range(n)]


def encode(events: list[dict[str, Any]]) -> str:
    return json.dumps({"data": events}, separators=(",", ":"), ensure_ascii=False)


async def send(s: aiohttp.ClientSession, url: str, frame: str) -> tuple[list[Any] | None, int]:
    """One message on its own connection: (ids acknowledged or None, close code)."""
    async with s.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_str(frame)
        msg = await ws.receive(timeout=120)
        if msg.type == aiohttp.WSMsgType.TEXT:
            return json.loads(msg.data)["reportedIds"], 0
        return None, ws.close_code or 0


async def drain(url: str, q: list[dict[str, Any]]) -> dict[str, Any]:
    """A module's loop: the whole queue sent, the acknowledged ids dropped, until empty."""
    ticks = 0
    async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=0) as ws:
        while q:
            ticks += 1
            await ws.send_str(encode(q))
            acked = set(json.loads((await ws.receive(timeout=120)).data)["reportedIds"])
            q = [ev for ev in q if ev["id"] not in acked]
    return {"ticks": ticks}


async def send_all(url: str, frames: list[str]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(send(s, url, f) for f in frames))
    return {"acked": [len(a) if a is not None else None for a, _ in results],
            "closed": [code for a, code in results if a is None]}


def probe(port: int) -> None:
    """``--probe PORT``: GET /healthz back to back until SIGTERM, then the latencies (s)
    as JSON on stdout."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies = []
    while not stop:
        started = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        latencies.append(time.perf_counter() - started)
    print(json.dumps(latencies))


def measure(name: str, workdir: Path) -> dict[str, Any]:
    n, count = {"one-6mb": (11_000, 1), "one-30mb": (56_000, 1), "four-30mb": (56_000, 4),
                "drain-30mb": (56_000, 1), "one-30mb-ids10k": (56_000, 1)}[name]
    ids = 10_000 if name.endswith("ids10k") else 1_000_000
    queues = [queue(n, seed, ids) for seed in range(count)]
    frames = [encode(q) for q in queues]
    row: dict[str, Any] = {"size_mb": len(frames[0]) / MB}
    d = workdir / name
    d.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/app/{KEY}/track"
    cfg = write_agent_config(d / "agent.toml", port, d / "spool.db", free_port())
    proc = agent_proc(cfg, port, d / "agent.log").start()
    try:
        time.sleep(0.5)
        idle_rss, idle_anon = read_rss(proc.pid)
        prober = subprocess.Popen([sys.executable, "-m", "bench.nucleus_backlog", "--probe",
                                   str(port)], stdout=subprocess.PIPE)
        with RssSampler(proc.pid, interval=0.002) as rss:
            time.sleep(0.3)
            started = time.perf_counter()
            row.update(asyncio.run(drain(url, queues[0]) if name == "drain-30mb"
                                   else send_all(url, frames)))
            took = time.perf_counter() - started
            peak_rss, peak_anon = rss.take()
        prober.terminate()
        lat = sorted(json.loads(prober.communicate(timeout=60)[0]))
    finally:
        proc.stop()
    row.update({"idle_anon_mb": idle_anon / MB, "peak_anon_mb": peak_anon / MB,
                "idle_rss_mb": idle_rss / MB, "peak_rss_mb": peak_rss / MB, "seconds": took,
                "healthz_p99_ms": lat[max(0, int(len(lat) * 0.99) - 1)] * 1000,
                "healthz_max_ms": lat[-1] * 1000})
    print(f"  {name:15s} RssAnon idle {row['idle_anon_mb']:4.0f} peak {row['peak_anon_mb']:4.0f}"
          f"  VmRSS idle {row['idle_rss_mb']:4.0f} peak {row['peak_rss_mb']:4.0f} MB"
          f"  {took:5.2f} s  /healthz p99 {row['healthz_p99_ms']:5.1f} max "
          f"{row['healthz_max_ms']:5.1f} ms  "
          + f"{row['size_mb']:.1f} MB, "
          + ", ".join(f"{k} {v}" for k, v in row.items() if k in ("acked", "closed", "ticks")),
          flush=True)
    return row


SCENARIOS = ["one-6mb", "one-30mb", "one-30mb-ids10k", "four-30mb", "drain-30mb"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nucleus_backlog",
                                description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma list of: " + ", ".join(SCENARIOS))
    p.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        probe(args.probe)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="outpost-bench-backlog-"))
    try:
        for name in [w for w in args.only.split(",") if w] or SCENARIOS:
            measure(name, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
