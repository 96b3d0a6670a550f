"""Soak: N minutes of mixed load with the upstream flapping; resources must stay flat.

    python -m bench.soak                 # 30 minutes, the upstream down/up every minute
    python -m bench.soak --minutes 5     # a shorter run

The agent runs as a real subprocess (`python -m agent run`); the apps (Nucleus
websocket and HTTP clients, tests/fakes/clients.py) and a counting fake Nucleus
upstream run in this process. The upstream goes down and comes back every
``--flap-s`` seconds. Every ``--sample-s`` seconds the agent's RSS, open file
descriptors, spool size on disk, queue depth and oldest queued event (lag) are
sampled. At the end the upstream stays up until the queue drains, and every
event the agent acknowledged to an app is checked to have arrived upstream.

Writes samples.csv, summary.json and (when matplotlib is installed) soak.png to
``--out`` (default bench/out/soak-<time>/), and prints whether each stayed flat:
the peak of the second half of the run (after warm-up) within a tolerance of
the peak of the first half.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import psutil  # noqa: E402
from aiohttp import web  # noqa: E402

from tests.conftest import AgentProcess, free_port, write_config  # noqa: E402
from tests.fakes.clients import Ledger, NucleusClient, mark_of  # noqa: E402
from tests.fakes.nucleus_upstream import FakeNucleus  # noqa: E402

# metric -> (relative, absolute) tolerance for "flat": late peak <= early peak * (1 + rel) + abs
TOLERANCE = {"rss_mb": (0.15, 8.0), "fds": (0.0, 6.0), "queue_mb": (0.25, 2.0),
             "queue_depth": (0.5, 2000.0), "lag_s": (0.5, 15.0)}
# Reported, not judged: the dedupe keys of delivered events are kept for
# storage.dedupe_window_h (24 h by default), so this grows for a day, then levels off.
GROWS_BY_DESIGN = ("spool_mb", "dedupe_mb")


class CountingNucleus(FakeNucleus):
    """The fake upstream, keeping only which marks arrived and how often (flat memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: Counter[str] = Counter()
        self.received = 0

    def _record(self, request: web.Request, msg: Any) -> list[Any]:
        self.frames += 1
        ids = []
        for ev in msg.get("data", []):
            if ev.get("type") == "heartbeat":
                continue
            self.received += 1
            mark = mark_of(ev)
            if mark is not None:
                self.arrivals[mark] += 1
            if "id" in ev:
                ids.append(ev["id"])
        return ids


@dataclass
class Sample:
    t_s: float
    upstream_up: int
    rss_mb: float
    fds: int
    spool_mb: float       # spool, -wal and -shm files on disk
    dedupe_mb: float      # of which: remembered dedupe keys of delivered events
    queue_mb: float       # spool_mb - dedupe_mb: the queue itself, WAL included
    dedupe_keys: int
    queue_depth: int
    lag_s: float
    acked_to_apps: int
    delivered: int


def spool_mb(path: Path) -> float:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            total += p.stat().st_size
    return total / 1e6


def dedupe_share(path: Path) -> tuple[float, int]:
    """Bytes and count of the spool's stored dedupe keys of delivered events, read-only
    (the ``spent`` table: 8 bytes a key plus its rows' share of their pages). The running
    agent also holds every key of the window in memory (docs/operations.md)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
    except sqlite3.Error:
        return 0.0, 0
    try:
        keys, nbytes = conn.execute(
            "SELECT coalesce(sum(length(dkeys)) / 8, 0), coalesce(sum(length(dkeys)), 0) "
            "FROM spent").fetchone()
        try:
            (size,) = conn.execute("SELECT coalesce(sum(pgsize), 0) FROM dbstat "
                                   "WHERE name = 'spent'").fetchone()
        except sqlite3.Error:  # no dbstat in this SQLite build: the keys alone
            size = nbytes
        return size / 1e6, int(keys)
    except sqlite3.Error:
        return 0.0, 0
    finally:
        conn.close()


async def status(session: aiohttp.ClientSession, agent: AgentProcess) -> dict[str, Any]:
    async with session.get(f"{agent.url}/status", timeout=aiohttp.ClientTimeout(total=5)) as r:
        return dict(await r.json())


def flat(samples: list[Sample], metric: str, warmup: float) -> dict[str, Any]:
    """Peak of the second half of the run against the peak of the first half."""
    values = [getattr(s, metric) for s in samples if s.t_s >= warmup]
    if len(values) < 4:
        return {"metric": metric, "flat": None, "why": "too few samples"}
    half = len(values) // 2
    early, late = max(values[:half]), max(values[half:])
    rel, absolute = TOLERANCE[metric]
    limit = early * (1 + rel) + absolute
    return {"metric": metric, "early_peak": round(early, 2), "late_peak": round(late, 2),
            "limit": round(limit, 2), "flat": late <= limit}


def plot(samples: list[Sample], out: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = ["rss_mb", "fds", "spool_mb", "queue_mb", "queue_depth", "lag_s"]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(10, 12), sharex=True)
    t = [s.t_s / 60 for s in samples]
    for ax, metric in zip(axes, metrics):
        ax.plot(t, [getattr(s, metric) for s in samples])
        ax.fill_between(t, 0, 1, where=[not s.upstream_up for s in samples], alpha=0.15,
                        color="red", transform=ax.get_xaxis_transform(), step="post")
        ax.set_ylabel(metric)
    axes[-1].set_xlabel("minutes (red: upstream down)")
    fig.tight_layout()
    fig.savefig(out)
    return True


async def soak(args: argparse.Namespace) -> int:
    out = Path(args.out or ROOT / "bench" / "out" / time.strftime("soak-%Y%m%dT%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="outpost-soak-"))
    fake = CountingNucleus()
    await fake.start(free_port())
    port = free_port()
    spool = work / "spool.db"
    cfg = write_config(work / "agent.toml", spool, port=port, upstreams=[
        {"name": "ws", "protocol": "nucleus-ws", "url": fake.url, "keys": ["ws1", "ws2"],
         "flush_interval_s": 0.5},
        {"name": "http", "protocol": "nucleus-http", "url": fake.http_url, "keys": ["*"],
         "flush_interval_s": 0.5},
    ])
    agent = AgentProcess(cfg, port)
    await asyncio.to_thread(agent.start)
    assert agent.proc is not None
    proc = psutil.Process(agent.proc.pid)
    ledger = Ledger()
    stop = asyncio.Event()
    mix = [("ws1", "ws"), ("ws1", "http"), ("ws2", "ws"), ("http1", "ws"), ("http1", "http"),
           ("http2", "http")]
    clients = [NucleusClient(agent.url, *mix[i % len(mix)], ledger, interval=args.interval,
                             max_queue=2000, rng=random.Random(i)) for i in range(args.clients)]
    tasks = [asyncio.create_task(c.run(stop)) for c in clients]
    samples: list[Sample] = []
    started = time.monotonic()
    duration = args.minutes * 60
    up, next_flap = True, args.flap_s
    print(f"soak: {args.minutes:g} min, {len(clients)} apps, upstream flapping every "
          f"{args.flap_s:g} s; agent pid {proc.pid}; writing {out}", flush=True)
    async with aiohttp.ClientSession() as session:
        while (elapsed := time.monotonic() - started) < duration:
            if elapsed >= next_flap:
                if up:
                    await fake.go_down()
                else:
                    await fake.come_back()
                up, next_flap = not up, next_flap + args.flap_s
            st = await status(session, agent)
            with proc.oneshot():
                rss, fds = proc.memory_info().rss / 1e6, proc.num_fds()
            on_disk = spool_mb(spool)
            dedupe, keys = await asyncio.to_thread(dedupe_share, spool)
            samples.append(Sample(round(elapsed, 1), int(up), round(rss, 2), fds,
                                  round(on_disk, 3), round(dedupe, 3),
                                  round(on_disk - dedupe, 3), keys, st["queue_depth"],
                                  st.get("oldest_event_age_s") or 0.0, len(ledger.acked),
                                  len(fake.arrivals)))
            if len(samples) % max(1, int(60 / args.sample_s)) == 0:
                print(json.dumps(asdict(samples[-1])), flush=True)
            await asyncio.sleep(args.sample_s)
        stop.set()
        await asyncio.gather(*tasks)
        if not up:
            await fake.come_back()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            async with session.post(f"{agent.url}/flush") as r:
                await r.read()
            st = await status(session, agent)
            if st["queue_depth"] == 0 and ledger.acked <= fake.arrivals.keys():
                break
            await asyncio.sleep(1)
    exit_code = await asyncio.to_thread(agent.terminate)
    await fake.stop()

    lost = ledger.acked - fake.arrivals.keys()
    duplicates = sum(n - 1 for n in fake.arrivals.values() if n > 1)
    warmup = min(120.0, duration * 0.1)
    verdicts = [flat(samples, m, warmup) for m in TOLERANCE]
    last = samples[-1]
    growth = {m: {"first": getattr(samples[0], m), "last": getattr(last, m)}
              for m in GROWS_BY_DESIGN}
    per_key = last.dedupe_mb * 1e6 / last.dedupe_keys if last.dedupe_keys else None
    summary = {
        "minutes": round((time.monotonic() - started) / 60, 2), "apps": len(clients),
        "flap_s": args.flap_s, "samples": len(samples), "events_acked_to_apps": len(ledger.acked),
        "events_delivered": len(fake.arrivals), "lost": len(lost), "duplicates": duplicates,
        "app_requests_ok": ledger.requests_ok, "app_requests_failed": ledger.requests_failed,
        "agent_exit_code": exit_code, "final_counters": st.get("counters"),
        "verdicts": verdicts, "all_flat": all(v["flat"] for v in verdicts),
        "grows_by_design": growth,
        "dedupe_bytes_per_key": round(per_key, 1) if per_key else None,
    }
    with open(out / "samples.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(samples[0])))
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plotted = plot(samples, out / "soak.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "verdicts"}, indent=2))
    for v in verdicts:
        state = {True: "flat", False: "NOT FLAT", None: "n/a"}[v["flat"]]
        print(f"  {v['metric']:12} {state:9} early peak {v.get('early_peak')}  "
              f"late peak {v.get('late_peak')}  limit {v.get('limit')}")
    if per_key:
        print(f"  spool_mb     {growth['spool_mb']['first']} -> {growth['spool_mb']['last']} MB: "
              f"dedupe keys of delivered events, {per_key:.0f} B each, kept for "
              f"storage.dedupe_window_h (24 h), then pruned: level after a day")
    print(f"report: {out}/summary.json, samples.csv" + (", soak.png" if plotted else
                                                        " (pip install matplotlib for a plot)"))
    shutil.copy(agent.log, out / "agent.log")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["all_flat"] and not lost else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--flap-s", type=float, default=60.0,
                        help="the upstream goes down, then up, every this many seconds")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--interval", type=float, default=0.1,
                        help="seconds between each app's sends (1 to 5 events each)")
    parser.add_argument("--out", help="report directory (default bench/out/soak-<time>)")
    args = parser.parse_args(argv)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    raise SystemExit(main())
