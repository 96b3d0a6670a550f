"""The growing spool: how ingest holds up as the queue grows, with the upstream offline.

``fill`` posts ``n`` events in 100-event batches (the ingest table's load,
bounded in count) while a thread polls the agent's ``/healthz`` queue depth
and its CPU every 25 ms. The rate and CPU of the first and the last 10% of
the fill are read off that trace, interpolated at the depths where each tenth
starts and ends, so one uninterrupted load gives every tenth of the fill. The
start is known to one sample (25 ms plus a /healthz answer under load): fine
for a 1M fill's first 100k events, coarse for a small one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from . import loadgen
from .loadgen import Load
from .meters import cpu_seconds, per_million
from .payloads import APP_ID
from .procs import http_get
from .sampling import Sampler


@dataclass
class DepthTrace(Sampler):
    """(time, queue depth, agent CPU seconds) samples, taken in a thread until the block ends."""

    pid: int
    port: int
    interval: float = 0.025
    samples: list[tuple[float, int, float]] = field(default_factory=list)

    def __enter__(self) -> Self:
        self.sample()  # the depth before the load: where its first tenth starts
        return super().__enter__()

    def sample(self) -> None:
        started = time.perf_counter()
        try:
            depth = int(json.loads(http_get(f"http://127.0.0.1:{self.port}/healthz",
                                            timeout=5.0))["queue_depth"])
            cpu = cpu_seconds(self.pid)
        except (OSError, ValueError, KeyError):
            return  # a slow answer under load: the next sample covers it
        # The depth was read somewhere inside the request: stamp it at the midpoint.
        self.samples.append(((started + time.perf_counter()) / 2, depth, cpu))

    def at_depth(self, level: float) -> tuple[float, float] | None:
        """(time, CPU) when the depth first reached ``level``, linearly interpolated."""
        prev = self.samples[0]
        for cur in self.samples:
            if cur[1] >= level:
                if cur[1] == prev[1]:
                    return cur[0], cur[2]
                f = (level - prev[1]) / (cur[1] - prev[1])
                return prev[0] + f * (cur[0] - prev[0]), prev[2] + f * (cur[2] - prev[2])
            prev = cur
        return None


def _span(trace: DepthTrace, lo: float, hi: float) -> dict[str, Any]:
    """Events/s and CPU s per million events between two depths of the trace."""
    a, b = trace.at_depth(lo), trace.at_depth(hi)
    if a is None or b is None or b[0] <= a[0]:
        return {"events_per_s": None, "cpu_s_per_m": None}
    events = hi - lo
    return {"events_per_s": events / (b[0] - a[0]), "cpu_s_per_m": per_million(b[1] - a[1], events),
            "from_depth": lo, "to_depth": hi}


def fill(pid: int, port: int, n: int, connections: int, workdir: Path, use_wrk: bool,
         wrk_threads: int = 1, kind: str = "nucleus") -> dict[str, Any]:
    """Fill the agent's spool with ``n`` more events of ``kind`` (Nucleus HTTP batches, or
    Segment ``/v1/batch``); the whole fill, and its first and last 10%."""
    path = f"/app/{APP_ID}/track" if kind == "nucleus" else "/v1/batch"
    load = Load(f"http://127.0.0.1:{port}{path}", kind, 100, connections,
                duration=max(600.0, n / 2_000), max_requests=max(1, n // 100))
    with DepthTrace(pid, port) as trace:
        result = loadgen.run(load, workdir, use_wrk, wrk_threads)
    base = trace.samples[0][1]
    end = base + (n // 100) * 100
    # The fill starts at the last sample before the depth moved: the load generator's own
    # start-up (300 ms for the Python client) is not the agent's time.
    moved = next((i for i, s in enumerate(trace.samples) if s[1] > base), len(trace.samples))
    trace.samples = trace.samples[max(0, moved - 1):]
    out: dict[str, Any] = {
        "events": n, "start_depth": base, "end_depth": trace.samples[-1][1],
        "events_per_s": result["events_per_s"], "p99_ms": result["p99_ms"],
        "errors": result["errors"], "generator": result["raw"].get("generator", ""),
        "first_10pct": _span(trace, base, base + 0.1 * (end - base)),
        "last_10pct": _span(trace, base + 0.9 * (end - base), end),
        "trace_samples": len(trace.samples),
    }
    out["last_over_first"] = _ratio(out["last_10pct"]["events_per_s"],
                                    out["first_10pct"]["events_per_s"])
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None
