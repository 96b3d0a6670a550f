"""Idle wakeups: what an agent with nothing to do costs, counted from outside it.

An agent with an empty spool and one upstream configured (the fake Nucleus
websocket upstream, online) gets no traffic. After a settle (start-up work is
not idle), its voluntary context switches (each is a sleep that ended: a
wakeup) and CPU are read over ``seconds``; a wakeup rate, not a latency.
"""

from __future__ import annotations

import time
from typing import Any

from .harness import Harness
from .meters import CpuWindow, main_thread_switches, switches_between, voluntary_switches
from .procs import free_port, read_rss, upstream_proc

SETTLE_S = 2.0


def idle(h: Harness, seconds: float) -> dict[str, Any]:
    d = h.dir("idle")
    up_port = free_port()
    upstream = upstream_proc(up_port, d / "upstream.log").start()
    try:
        agent = h.start_agent(d, up_port, "nucleus-ws")
        try:
            time.sleep(SETTLE_S)
            before, main_before = voluntary_switches(agent.pid), main_thread_switches(agent.pid)
            with CpuWindow(agent.pid) as cpu:
                # The measurement itself: the agent is left alone for the window.
                time.sleep(seconds)
            after, main_after = voluntary_switches(agent.pid), main_thread_switches(agent.pid)
            rss = read_rss(agent.pid)
        finally:
            agent.stop()
    finally:
        upstream.stop()
    total = switches_between(before, after)
    out = {"seconds": seconds, "wakeups_per_s": total / seconds,
           "main_thread_wakeups_per_s": (main_after - main_before) / seconds,
           "threads_before": len(before), "threads_after": len(after),
           "cpu_s": cpu.seconds, "cpu_pct": 100 * cpu.seconds / seconds, "rss": rss}
    print(f"  idle {seconds:.0f} s: {out['wakeups_per_s']:.2f} wakeups/s over "
          f"{len(after)} threads (main thread {out['main_thread_wakeups_per_s']:.2f}/s); "
          f"CPU {out['cpu_pct']:.3f}%", flush=True)
    return out
