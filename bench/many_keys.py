"""Per-key cost of the agent: RSS and CPU of a real `outpost run` fed N distinct keys.

    python -m bench.many_keys --keys 100000 --upstream nucleus-ws

Each key gets one Nucleus HTTP request (`POST /app/{key}/track`) or one Segment
`POST /v1/track` with the key as Basic auth (``--dialect segment``). At each
checkpoint the script waits until the fake upstream (a real aiohttp server in
this process) has every event, then prints the agent's RSS and CPU time. It
also waits for delivery every ``--step`` keys: keys still queued hold a
forwarding loop (a few KB each), which is a backlog, not the idle cost.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment

CONCURRENCY = 32


def request_for(dialect: str, port: int, i: int) -> tuple[str, dict[str, Any], dict[str, str]]:
    key = f"key-{i:07d}-abcdef"
    if dialect == "segment":
        auth = base64.b64encode(f"{key}:".encode()).decode()
        return (f"http://127.0.0.1:{port}/v1/track",
                {"event": "e", "userId": "u", "messageId": f"m{i}"},
                {"Authorization": f"Basic {auth}"})
    return (f"http://127.0.0.1:{port}/app/{key}/track",
            {"data": [{"type": "event", "name": "e", "id": i, "sessionId": 1}]}, {})


async def feed(session: aiohttp.ClientSession, dialect: str, port: int, start: int,
               stop: int) -> None:
    numbers = iter(range(start, stop))

    async def worker() -> None:
        for i in numbers:
            url, body, headers = request_for(dialect, port, i)
            async with session.post(url, json=body, headers=headers) as resp:
                if resp.status >= 300:
                    raise RuntimeError(f"key {i}: HTTP {resp.status} {await resp.text()}")

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def delivered(fake: FakeNucleus | FakeSegment, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(fake.events) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"upstream has {len(fake.events)}/{count}")
        await asyncio.sleep(0.05)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        fake: FakeNucleus | FakeSegment | None = None
        upstreams: list[dict[str, Any]] = []
        if args.upstream in ("nucleus-ws", "nucleus-http"):
            fake = await FakeNucleus().start()
            url = fake.url if args.upstream == "nucleus-ws" else fake.http_url
            upstreams = [{"name": "up", "protocol": args.upstream, "url": url,
                          "flush_interval_s": 0.05}]
        elif args.upstream == "segment-http":
            fake = await FakeSegment().start()
            upstreams = [{"name": "up", "protocol": "segment-http", "url": fake.url,
                          "flush_interval_s": 0.05}]
        port = free_port()
        cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                           listen={"max_keys": max(args.keys, 1)},
                           storage={"sync": "normal"}, upstreams=upstreams)
        agent = AgentProcess(cfg, port).start()
        assert agent.proc is not None
        proc = psutil.Process(agent.proc.pid)
        try:
            connector = aiohttp.TCPConnector(limit=CONCURRENCY)
            async with aiohttp.ClientSession(connector=connector) as session:
                done = 0
                last_cpu = sum(proc.cpu_times()[:2])
                print(f"{'keys':>8} {'rss MB':>8} {'KB/key':>8} {'cpu s':>8} "
                      f"{'ms cpu/key':>10} {'wall s':>7}", flush=True)
                base_rss = proc.memory_info().rss
                for target in args.checkpoints:
                    if target > args.keys:
                        break
                    t0 = time.monotonic()
                    # Delivered every --step keys, so that what is measured is idle keys,
                    # not a backlog of keys still waiting for the upstream.
                    for start in range(done, target, args.step):
                        end = min(start + args.step, target)
                        await feed(session, args.dialect, port, start, end)
                        if fake is not None:
                            await delivered(fake, end, args.deliver_timeout)
                    wall = time.monotonic() - t0
                    rss = proc.memory_info().rss
                    cpu = sum(proc.cpu_times()[:2])
                    print(f"{target:>8} {rss / 2**20:>8.1f} "
                          f"{(rss - base_rss) / 1024 / target:>8.2f} {cpu:>8.1f} "
                          f"{(cpu - last_cpu) * 1000 / (target - done):>10.2f} {wall:>7.1f}",
                          flush=True)
                    last_cpu, done = cpu, target
        finally:
            code = agent.terminate(60)
            if fake is not None:
                await fake.stop()
            log = agent.log.read_text()
            print(f"agent exit {code}; log {len(log.splitlines())} lines", file=sys.stderr)
            if args.show_log:
                print(log[-3000:], file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--upstream", default="nucleus-ws",
                        choices=("nucleus-ws", "nucleus-http", "segment-http", "none"))
    parser.add_argument("--dialect", default="nucleus", choices=("nucleus", "segment"))
    parser.add_argument("--show-log", action="store_true")
    parser.add_argument("--deliver-timeout", type=float, default=600.0)
    parser.add_argument("--step", type=int, default=1000,
                        help="wait for delivery every STEP keys (a huge STEP lets a backlog build)")
    parser.add_argument("--checkpoints", type=int, nargs="+",
                        default=[1000, 2000, 3000, 5000, 10_000, 20_000, 50_000, 100_000])
    asyncio.run(main(parser.parse_args()))
