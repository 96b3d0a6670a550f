"""`python -m bench.large`: the largest posts each API allows, eight at a time.

For each scenario a fresh `outpost run` (upstream offline: pure ingest) takes
``--rounds`` rounds of 8 concurrent maximum-size posts, while a thread probes
GET /healthz back to back over one keep-alive connection and another samples
RSS every 5 ms. Reported per scenario: posts admitted / answered busy, idle and
peak RSS, RSS ``--settle`` seconds after the load (the issue's target: within
15 MB of idle 60 s after any load; `--settle 60` measures exactly that), and
/healthz latency p50 / p99 / max (target: p99 under 100 ms).

Bodies come from tests/load_bodies.py, the same the regression tests send.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.load_bodies import KEY, ROUTES, Route, lenient_batch, nucleus_body

from .procs import ROOT, RssSampler, agent_proc, free_port, read_rss, write_agent_config

MB = 1024 * 1024
CONCURRENT = 8


class Prober(threading.Thread):
    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stop.wait(0.005):
            started = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            self.latencies.append(time.perf_counter() - started)
        conn.close()


async def _http_round(s: aiohttp.ClientSession, base: str, route: Route,
                      bodies: list[bytes]) -> list[int]:
    async def one(body: bytes) -> int:
        async with s.post(base + route.path, data=body, headers=route.headers) as r:
            await r.read()
            return r.status
    return list(await asyncio.gather(*(one(b) for b in bodies)))


async def _ws_round(s: aiohttp.ClientSession, base: str, frames: list[bytes]) -> list[int]:
    async def one(frame: bytes) -> int:
        async with s.ws_connect(base + f"/app/{KEY}/track", max_msg_size=0) as ws:
            await ws.send_bytes(frame)
            msg = await ws.receive(timeout=120)
            return 200 if msg.type == aiohttp.WSMsgType.TEXT else ws.close_code or 0
    return list(await asyncio.gather(*(one(f) for f in frames)))


def scenarios() -> dict[str, tuple[Route | None, Any]]:
    by_name = {r.name: r for r in ROUTES}
    return {"nucleus-http": (by_name["nucleus"], nucleus_body),
            "nucleus-ws": (None, nucleus_body),
            "lenient-batch": (by_name["batch"], lenient_batch),
            "segment-batch": (by_name["batch"], by_name["batch"].body),
            "tranthor-batch": (by_name["tranthor"], by_name["tranthor"].body)}


async def _load(port: int, route: Route | None, make: Any, rounds: int) -> list[int]:
    base = f"http://127.0.0.1:{port}"
    statuses: list[int] = []
    async with aiohttp.ClientSession() as s:
        for r in range(rounds):
            bodies = [make(r * 100 + i) for i in range(CONCURRENT)]
            statuses += (await _ws_round(s, base, bodies) if route is None
                         else await _http_round(s, base, route, bodies))
    return statuses


def measure(name: str, route: Route | None, make: Any, args: argparse.Namespace,
            workdir: Path) -> dict[str, Any]:
    d = workdir / name
    d.mkdir()
    port = free_port()
    cfg = write_agent_config(d / "agent.toml", port, d / "spool.db", free_port())
    proc = agent_proc(cfg, port, d / "agent.log").start()
    try:
        time.sleep(0.5)
        idle = read_rss(proc.pid)[0]
        prober = Prober(port)
        with RssSampler(proc.pid, interval=0.005) as rss:
            prober.start()
            statuses = asyncio.run(_load(port, route, make, args.rounds))
            prober.stop.set()
            prober.join(10)
            peak = rss.take()[0]
        time.sleep(args.settle)
        settled = read_rss(proc.pid)[0]
    finally:
        proc.stop()
    lat = sorted(prober.latencies)
    ok = sum(1 for s in statuses if s in (200, 201, 204))
    row = {"posts": len(statuses), "admitted": ok, "busy": len(statuses) - ok,
           "idle_mb": idle / MB, "peak_mb": peak / MB, "settled_mb": settled / MB,
           "settle_s": args.settle, "probes": len(lat),
           "healthz_p50_ms": statistics.median(lat) * 1000,
           "healthz_p99_ms": lat[max(0, int(len(lat) * 0.99) - 1)] * 1000,
           "healthz_max_ms": lat[-1] * 1000}
    print(f"  {name:15s} {ok:3d}/{len(statuses):<3d} admitted  RSS idle {row['idle_mb']:5.0f}"
          f"  peak {row['peak_mb']:5.0f}  +{args.settle:.0f}s {row['settled_mb']:5.0f} MB   "
          f"/healthz p50 {row['healthz_p50_ms']:6.1f}  p99 {row['healthz_p99_ms']:6.1f}  "
          f"max {row['healthz_max_ms']:6.1f} ms  ({len(lat)} probes)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.large", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds of 8 concurrent posts")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait after the load")
    p.add_argument("--only", default="", help="comma list of scenarios")
    args = p.parse_args(argv)
    wanted = [w for w in args.only.split(",") if w] or list(scenarios())
    workdir = Path(tempfile.mkdtemp(prefix="outpost-bench-large-"))
    results = {}
    try:
        for name in wanted:
            route, make = scenarios()[name]
            results[name] = measure(name, route, make, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "large-latest.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
