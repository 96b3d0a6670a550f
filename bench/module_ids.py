"""A Nucleus backlog whose ids repeat, drained to nucleus-ws: `python -m bench.module_ids`.

    python -m bench.module_ids [--events N] [--pool IDS]

Nucleus modules give each event a small random id (python: 1..10000, nodejs: 1..1e6),
so the ids of a backlog repeat. A `reportedIds` ack names only ids, so the uplink
keeps the ids in flight on a connection distinct: a frame ends before an id already in
it or in flight, and the next one waits for that id's ack. The bench's other drains
give every event a new id and never meet this.

Two fresh `outpost run`s (upstream offline) each take ``N`` events (100-event posts,
no id twice in one post, as a module's queue): one with unique ids, one with ids drawn
from 1..``--pool`` (default 10,000). Then the fake upstream (`python -m bench.upstream`)
starts, `POST /flush`, and each drain is timed until `queue_depth` is 0: events/s,
events per frame (the sink's count), the agent's CPU per million events. The same-run
reference is the unique-id drain: the ratio is the repeated-id drain over it.

Bounded: every post and wait has a timeout; the scratch directory is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .harness import depth, wait_empty
from .meters import CpuWindow, per_million
from .payloads import APP_ID, NUCLEUS_EVENT
from .procs import agent_proc, free_port, http_get, http_post, upstream_proc, write_agent_config


def _posts(n: int, pool: int) -> list[bytes]:
    """``n`` events in 100-event posts; ``pool`` 0: unique ids, else ids from 1..pool."""
    rnd, posts = random.Random(1), []
    for r in range(-(-n // 100)):
        count = min(100, n - 100 * r)
        if pool:
            ids = rnd.sample(range(1, pool + 1), count)   # distinct within a post
        else:
            ids = list(range(100 * r + 1, 100 * r + count + 1))
        # The session differs per post: events with a repeated id are still new events.
        events = ",".join(NUCLEUS_EVENT % (i, r) for i in ids)
        posts.append(f'{{"data":[{events}]}}'.encode())
    return posts


def run_case(name: str, pool: int, n: int, work: Path, timeout: float) -> dict[str, Any]:
    d = work / name
    (d / "spool").mkdir(parents=True)
    port, up_port = free_port(), free_port()
    cfg = write_agent_config(d / "agent.toml", port, d / "spool" / "spool.db", up_port,
                             "nucleus-ws")
    agent = agent_proc(cfg, port, d / "agent.log").start()
    upstream = upstream_proc(up_port, d / "upstream.log")
    try:
        for body in _posts(n, pool):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/app/{APP_ID}/track",
                                         data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
        queued = depth(port)
        upstream.start()
        with CpuWindow(agent.pid) as cpu:
            http_post(f"http://127.0.0.1:{port}/flush")
            elapsed, left = wait_empty(port, timeout)
        got = json.loads(http_get(f"http://127.0.0.1:{up_port}/count"))
    finally:
        agent.stop()
        upstream.stop()
    drained = queued - left
    return {"case": name, "pool": pool, "queued": queued, "left": left, "seconds": elapsed,
            "events_per_s": drained / elapsed, "cpu_s_per_m": per_million(cpu.seconds, drained),
            "frames": got["frames"], "events_per_frame": got["events"] / max(got["frames"], 1)}


def _table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["events_per_s"]
    out = ["| ids | queued | drain, events/s | events per frame | agent CPU s/M | ÷ unique ids |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        ids = "unique" if not r["pool"] else f"1..{r['pool']:,}"
        left = f" ({r['left']:,} left)" if r["left"] else ""
        out.append(f"| {ids} | {r['queued']:,}{left} | {r['events_per_s']:,.0f} | "
                   f"{r['events_per_frame']:.1f} | {r['cpu_s_per_m']:.1f} | "
                   f"{r['events_per_s'] / base:.2f}× |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=100_000, help="events per backlog")
    p.add_argument("--pool", type=int, default=10_000,
                   help="repeated ids drawn from 1..POOL (python module: 10000)")
    p.add_argument("--timeout", type=float, default=300.0, help="drain limit, seconds")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="outpost-bench-ids-"))
    try:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        rows = [run_case("unique", 0, args.events, work, args.timeout),
                run_case("repeated", args.pool, args.events, work, args.timeout)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"nucleus-ws drains, {started}")
    print(_table(rows))


if __name__ == "__main__":
    main()
