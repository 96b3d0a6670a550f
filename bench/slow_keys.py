"""Memory while many keys wait on a slow upstream: `python -m bench.slow_keys`.

    python -m bench.slow_keys --keys 200 --events 200 --size 2000

A real `outpost run` (sync = "normal") takes ``--keys`` Segment batches of ``--events``
incompressible events of ``--size`` bytes, one batch per key, while its `segment-http`
upstream (an aiohttp server in this process) holds every request until the load is in.
The agent's RSS after it started and its peak while the keys wait are printed beside
each other; then the upstream answers and the script waits for the drain. Each batch in
flight holds its rows and its body, so the peak is what the send slots bound
(agent/forwarder/slots.py). Bounded: every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web

from .procs import free_port, http_get, write_agent_config


async def measure(keys: int, events: int, size: int, hold_s: float) -> dict[str, float]:
    gate = asyncio.Event()
    answered = 0

    async def batch(request: web.Request) -> web.Response:
        nonlocal answered
        await request.read()
        await gate.wait()
        answered += 1
        return web.json_response({"success": True})

    app = web.Application(client_max_size=2**24)
    app.router.add_post("/v1/batch", batch)
    runner = web.AppRunner(app)
    await runner.setup()
    up = free_port()
    await web.TCPSite(runner, "127.0.0.1", up).start()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "spool").mkdir()
        port = free_port()
        cfg = write_agent_config(d / "agent.toml", port, d / "spool" / "spool.db", up,
                                 "segment-http", "normal", "flush_interval_s = 0.1\n"
                                 "timeout_s = 120\n")
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)])
        try:
            agent = psutil.Process(proc.pid)
            for _ in range(150):
                try:
                    http_get(f"http://127.0.0.1:{port}/healthz")
                    break
                except OSError:
                    await asyncio.sleep(0.2)
            started = agent.memory_info().rss
            rng = random.Random(1)
            async with aiohttp.ClientSession() as s:
                for k in range(keys):
                    body = [{"type": "track", "event": "e", "userId": "u",
                             "messageId": f"{k}-{i}",
                             "properties": {"r": rng.randbytes(size // 2).hex()}}
                            for i in range(events)]
                    auth = base64.b64encode(f"key{k}:".encode()).decode()
                    async with s.post(f"http://127.0.0.1:{port}/v1/batch", json={"batch": body},
                                      headers={"Authorization": f"Basic {auth}"}) as r:
                        assert r.status == 200, await r.text()
            peak = 0
            until = time.monotonic() + hold_s
            while time.monotonic() < until:
                peak = max(peak, agent.memory_info().rss)
                await asyncio.sleep(0.25)
            gate.set()
            until = time.monotonic() + 300
            while answered < keys and time.monotonic() < until:   # one batch a key at least
                await asyncio.sleep(0.25)
        finally:
            proc.terminate()
            proc.wait(30)
            await runner.cleanup()
    return {"rss_started_mb": started / 1e6, "rss_peak_waiting_mb": peak / 1e6,
            "requests_answered": answered}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=200)
    p.add_argument("--events", type=int, default=200, help="events per key")
    p.add_argument("--size", type=int, default=2000, help="bytes of noise per event")
    p.add_argument("--hold", type=float, default=10.0, help="seconds the upstream holds")
    a = p.parse_args()
    r = asyncio.run(measure(a.keys, a.events, a.size, a.hold))
    print(f"{a.keys} keys x {a.events} events of ~{a.size} B, upstream holding requests: "
          f"RSS {r['rss_started_mb']:.0f} MB started, peak {r['rss_peak_waiting_mb']:.0f} MB "
          f"while the keys wait ({r['rss_peak_waiting_mb'] / r['rss_started_mb']:.2f}x); "
          f"{r['requests_answered']} requests answered after")


if __name__ == "__main__":
    main()
