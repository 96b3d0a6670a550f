"""What one GET /status, /metrics and /healthz costs as queued keys and dead letters grow:
`python -m bench.status_scale [--keys 1000,30000] [--dead 0,100000] [--polls 40]`.

For each count of keys: a spool filled through the Spool API (two events queued per
key, one in each lane, plus ``--dead`` dead letters of one more key, under three
reasons), then a real agent on it, in this process, on a low battery whose rule is
"hold": nothing is sent, so the figures hold still while they are read. A client
thread (urllib, its own connections) then polls each route ``--polls`` times and
prints the median and the 90th percentile of the reply time, and the median time a
dead-letter summary takes to come back after a change of the dead letters (one more
letter, then one /status). Bounded: every fill and every poll stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from agent import config as config_mod
from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.families.lanes import HIGH, NORMAL
from agent.service import Agent
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.sync.policy import Battery
from tests.conftest import write_config

ROUTES = ("/status", "/metrics", "/healthz")
CHUNK = 5_000          # events per append: one group commit
REASONS = ("400: bad event", "422: unprocessable", "413: too large")
DEAD_KEY = "bench-dead-key"


def _event(key: str, n: int, lane: int) -> Event:
    body = b'{"type":"event","name":"e","id":%d,"sessionId":1}' % n
    return Event(key, NUCLEUS, dedupe_key(key, n), body, n, lane)


async def fill(path: Path, keys: int, dead: int) -> None:
    """``keys`` keys with two events queued each; ``dead`` dead letters of one more key."""
    spool = await Spool.open(StorageConfig(path=str(path), sync="normal"))
    try:
        events = [_event(f"bench-key-{i:07d}", 2 * i + lane, lane)
                  for i in range(keys) for lane in (HIGH, NORMAL)]
        events += [_event(DEAD_KEY, n, NORMAL) for n in range(dead)]
        for start in range(0, len(events), CHUNK):
            await spool.append(events[start:start + CHUNK])
        if dead:
            stream = spool.streams[DEAD_KEY].id
            for start in range(0, dead, CHUNK):
                rows = await spool.fetch(stream, -1, CHUNK)   # what is left, from its head
                await spool.dead_letter([(r.seq, "up", REASONS[r.seq % len(REASONS)])
                                         for r in rows])
    finally:
        await spool.close()


def _get(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        r.read()
    return time.perf_counter() - started


async def poll(url: str, polls: int) -> tuple[float, float]:
    """Median and 90th percentile, in ms, of ``polls`` GETs of ``url`` one after another."""
    times = sorted([await asyncio.to_thread(_get, url) for _ in range(polls)])
    return statistics.median(times) * 1000, times[int(len(times) * 0.9) - 1] * 1000


async def summary_after_change(agent: Agent, url: str, polls: int) -> float:
    """Median ms of a /status that has to summarise the dead letters again: each poll
    follows a change (one more dead letter)."""
    assert agent.spool is not None
    spool, times = agent.spool, []
    for i in range(polls):
        await spool.append([_event("bench-more-dead", i, NORMAL)])
        rows = await spool.fetch(spool.streams["bench-more-dead"].id, -1, 1)
        await spool.dead_letter([(rows[0].seq, "up", REASONS[0])])
        times.append(await asyncio.to_thread(_get, url))
    return statistics.median(times) * 1000


async def measure(keys: int, dead: int, polls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool.db"
        started = time.perf_counter()
        await fill(spool, keys, dead)
        filled = time.perf_counter() - started
        cfg = write_config(Path(tmp) / "agent.toml", spool, storage={"sync": "normal"},
                           upstreams=[{"name": "up", "protocol": "nucleus-http",
                                       "url": "http://127.0.0.1:9", "keys": ["*"]}],
                           sync={"on_low_battery": "hold", "low_battery_pct": 20})
        agent = Agent(config_mod.load_file(cfg), str(cfg),
                      battery=lambda: Battery(percent=10, plugged=False))
        await agent.start()
        try:
            base = f"http://127.0.0.1:{agent.port}"
            await asyncio.to_thread(_get, base + "/status")   # the first summary, once
            cells = []
            for route in ROUTES:
                med, p90 = await poll(base + route, polls)
                cells.append(f"{route} {med:7.2f} / {p90:7.2f}")
            after = await summary_after_change(agent, base + "/status", min(polls, 10))
            print(f"keys {keys:>7,}  dead {dead:>8,}  (filled in {filled:5.1f} s)  "
                  + "  ".join(cells) + f"  /status after a dead-letter change {after:8.2f}",
                  flush=True)
        finally:
            await agent.stop()


async def main(args: argparse.Namespace) -> None:
    print("ms per request, median / p90, one client, nothing sent (a hold)")
    for dead in args.dead:
        for keys in args.keys:
            await measure(keys, dead, args.polls)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=_ints, default=[1000, 30000])
    parser.add_argument("--dead", type=_ints, default=[0])
    parser.add_argument("--polls", type=int, default=40)
    asyncio.run(main(parser.parse_args()))
