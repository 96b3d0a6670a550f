"""Drive one load: wrk (HTTP) when installed, else the Python client; the ws client always."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .payloads import BASIC_AUTH
from .procs import ROOT
from .wrk_script import lua_for

_seed = 0


def _next_seed() -> int:
    """Each run gets fresh ids, so a warm-up and its measurement never collide."""
    global _seed
    _seed += 1
    return _seed


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


@dataclass
class Load:
    """A workload's shape: where, what, how many events per request, how long."""

    url: str
    kind: str = "nucleus"     # payloads.KINDS, or "ws" for the websocket client
    events: int = 1
    connections: int = 32
    duration: float = 10.0
    max_requests: int = 0     # stop after this many requests (wrk: replies, per thread)
    any_reply: bool = False   # ws: the reference server does not ack, count any reply
    body_file: Path | None = None  # post this body as it is (a sink's ceiling), ``events`` each
    rate: float = 0.0         # events/s offered on a schedule (open loop: the Python client)


def _parse(out: str) -> dict[str, Any]:
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            result: dict[str, Any] = json.loads(line[len("BENCHJSON "):])
            return result
    raise RuntimeError(f"load generator printed no result:\n{out[-2000:]}")


def _wrk(load: Load, workdir: Path, threads: int) -> dict[str, Any]:
    threads = min(threads, load.connections)  # wrk refuses more threads than connections
    script = workdir / f"wrk-{load.kind}.lua"
    script.write_text(lua_for(load.kind, bounded=load.max_requests > 0,
                              fixed=load.body_file is not None))
    base, _, path = load.url.partition("://")[2].partition("/")
    env = {**os.environ, "BENCH_SEED": str(_next_seed()), "BENCH_EVENTS": str(load.events),
           "BENCH_PATH": "/" + path,
           "BENCH_AUTH": BASIC_AUTH if load.kind.startswith("segment") else "",
           "BENCH_MAX_REQUESTS": str(-(-load.max_requests // threads)),
           "BENCH_BODY_FILE": str(load.body_file or "")}
    argv = ["wrk", f"-t{threads}", f"-c{load.connections}", f"-d{max(1, round(load.duration))}s",
            "--timeout", "10s", "-s", str(script), f"http://{base}/"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True,
                          timeout=load.duration + 60)
    result = _parse(done.stdout)
    result["events"] = (result["requests"] - result["errors_status"]) * load.events
    result["generator"] = f"wrk -t{threads}"
    return result


def _python(load: Load) -> dict[str, Any]:
    mode = "ws" if load.kind == "ws" else "http"
    argv = [sys.executable, "-m", "bench.pyload", mode, "--url", load.url,
            "--kind", "nucleus" if mode == "ws" else load.kind, "--events", str(load.events),
            "--connections", str(load.connections), "--duration", str(load.duration),
            "--max-requests", str(load.max_requests), "--seed", str(_next_seed())]
    if load.any_reply:
        argv.append("--any-reply")
    if load.body_file is not None:
        argv += ["--body-file", str(load.body_file)]
    if load.rate:
        argv += ["--rate", str(load.rate)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          timeout=load.duration + 120)
    if done.returncode != 0:
        raise RuntimeError(f"python load generator failed:\n{done.stderr[-3000:]}")
    result = _parse(done.stdout)
    result["generator"] = (f"python (aiohttp, open loop at {load.rate:,.0f} events/s)"
                           if load.rate else "python (aiohttp, closed loop)")
    return result


def run(load: Load, workdir: Path, use_wrk: bool, wrk_threads: int = 1) -> dict[str, Any]:
    """Run ``load``; returns events/s, latency percentiles in ms, and the raw figures."""
    if load.kind != "ws" and use_wrk and not load.rate:
        raw = _wrk(load, workdir, wrk_threads)
    else:
        raw = _python(load)
    seconds = raw["duration_us"] / 1e6
    return {"events_per_s": raw["events"] / seconds if seconds else 0.0,
            "requests_per_s": raw["requests"] / seconds if seconds else 0.0,
            "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
            "errors": raw.get("errors_status", 0) + raw.get("errors_connect", 0)
            + raw.get("errors_timeout", 0), "raw": raw}
