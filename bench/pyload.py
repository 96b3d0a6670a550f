"""The Python load generator: `python -m bench.pyload http|ws ...`, run as its own process.

It stands in for wrk when wrk is missing (HTTP), and drives the websocket
workload, which wrk cannot. Every connection sends, waits for the reply, then
sends again (closed loop, not pipelined). With ``--rate`` (HTTP) it is an open
loop instead: requests start on a fixed schedule, whether or not earlier ones
were answered, and each latency counts from the request's scheduled start (so
a server that stalls is charged for every request it held up, not only the
first). It stops by itself at the deadline or after ``--max-requests``, and
prints one ``BENCHJSON {...}`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp
import orjson

from .payloads import BASIC_AUTH, body


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.events = 0
        self.sent = 0


def _headers(args: argparse.Namespace) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if args.kind.startswith("segment"):
        headers["Authorization"] = BASIC_AUTH
    return headers


async def _post(session: aiohttp.ClientSession, args: argparse.Namespace,
                headers: dict[str, str], data: bytes, since: float, stats: Stats) -> None:
    """POST ``data``; a success's latency counts from ``since`` (perf_counter)."""
    try:
        async with session.post(args.url, data=data, headers=headers) as resp:
            await resp.read()
            ok = resp.status < 300
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        ok = False
    if ok:
        stats.latencies.append(time.perf_counter() - since)
        stats.events += args.events
    else:
        stats.errors += 1


async def _http_worker(session: aiohttp.ClientSession, args: argparse.Namespace, wid: int,
                       deadline: float, stats: Stats) -> None:
    headers = _headers(args)
    counter = 0
    while time.monotonic() < deadline and (args.max_requests <= 0 or stats.sent < args.max_requests):
        stats.sent += 1
        counter += 1
        data = args.fixed or body(args.kind, counter * args.events, args.events,
                                  args.seed * 1000 + wid)
        await _post(session, args, headers, data, time.perf_counter(), stats)


async def _open_loop(session: aiohttp.ClientSession, args: argparse.Namespace,
                     deadline: float, stats: Stats) -> None:
    """Start a request every ``events / rate`` seconds until the deadline, each on its own,
    its latency counted from when it was due."""
    headers = _headers(args)
    interval = args.events / args.rate
    tasks: set[asyncio.Task[None]] = set()
    start, n = time.perf_counter(), 0
    end = start + (deadline - time.monotonic())
    while (due := start + n * interval) < end and (
            args.max_requests <= 0 or stats.sent < args.max_requests):
        # The loop's timers may fire up to a millisecond early: never send before due.
        while (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        n += 1
        stats.sent += 1
        data = body(args.kind, n * args.events, args.events, args.seed * 1000)
        task = asyncio.create_task(_post(session, args, headers, data, due, stats))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)


async def _ws_worker(session: aiohttp.ClientSession, args: argparse.Namespace, wid: int,
                     deadline: float, stats: Stats) -> None:
    counter = 0
    try:
        async with session.ws_connect(args.url, max_msg_size=0) as ws:
            while time.monotonic() < deadline and (
                    args.max_requests <= 0 or stats.sent < args.max_requests):
                stats.sent += 1
                counter += 1
                # A fixed frame is decoded once: at a sink's ceiling the client's work counts.
                text = args.fixed_text or body("nucleus", counter * args.events, args.events,
                                               args.seed * 1000 + wid).decode()
                started = time.perf_counter()
                await ws.send_str(text)
                msg = await ws.receive(timeout=max(1.0, deadline - time.monotonic() + 5))
                if msg.type != aiohttp.WSMsgType.TEXT:
                    stats.errors += 1
                    return
                if len(orjson.loads(msg.data).get("reportedIds", ())) != args.events \
                        and not args.any_reply:
                    stats.errors += 1
                    continue
                stats.latencies.append(time.perf_counter() - started)
                stats.events += args.events
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        stats.errors += 1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats()
    started = time.monotonic()
    deadline = started + args.duration
    timeout = aiohttp.ClientTimeout(total=args.duration + 10)
    conn = aiohttp.TCPConnector(limit=args.connections)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        if args.rate > 0:
            await _open_loop(session, args, deadline, stats)
        else:
            worker = _ws_worker if args.mode == "ws" else _http_worker
            await asyncio.gather(*(worker(session, args, i, deadline, stats)
                                   for i in range(args.connections)))
    elapsed = time.monotonic() - started
    lat = sorted(stats.latencies)

    def pct(p: float) -> int:
        return int(lat[min(len(lat) - 1, int(len(lat) * p))] * 1e6) if lat else 0
    return {"requests": len(lat), "duration_us": int(elapsed * 1e6), "errors_status": stats.errors,
            "events": stats.events, "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99),
            "max_us": int(lat[-1] * 1e6) if lat else 0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["http", "ws"])
    p.add_argument("--url", required=True)
    p.add_argument("--kind", default="nucleus")
    p.add_argument("--events", type=int, default=1)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-requests", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=0.0,
                   help="HTTP: events/s offered on a fixed schedule (open loop); "
                   "--connections then caps the connections, not the requests in flight")
    p.add_argument("--any-reply", action="store_true",
                   help="ws: count a frame on any reply (the hello server acks nothing)")
    p.add_argument("--body-file", help="send this body every time (a sink's ceiling); "
                   "--events says how many events it holds")
    args = p.parse_args()
    args.fixed = open(args.body_file, "rb").read() if args.body_file else b""
    args.fixed_text = args.fixed.decode()
    try:
        import uvloop
        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print("BENCHJSON " + orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
