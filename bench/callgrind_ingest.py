"""Instructions per ingest request, counted by callgrind: `python -m bench.callgrind_ingest`.

Timings on a shared 2-core machine move 2-4x between runs minutes apart; instruction
counts move 1-3%. This starts an Outpost agent (or a reference server: `--ref hello`)
under `valgrind --tool=callgrind` with instrumentation off, warms it up with wrk (a tenth
of the requests, at least 200), switches instrumentation on (`callgrind_control -i on`),
sends `--requests` more requests at `--connections` connections with wrk (stopped by
count, new ids in every request, as `python -m bench` does), switches it off once the
server is idle again and prints the instructions of every thread of the process per
event and per request, counted by the events the agent stored meanwhile (its `/status`
`ingested`; wrk's reply count for a reference server), not by wrk's replies.

Workloads: `single` (one event per `/v1/track` POST), `batch_segment` (100-event
`/v1/batch`), `batch_nucleus` (100-event Nucleus HTTP), `batch_nucleus_mapped` (the same,
its key routed to a `segment-http` upstream: mapped to Segment at ingest),
`batch_segment_mapped` (`/v1/batch`, its key routed to `nucleus-ws`: mapped),
`batch_segment_large` (200-event `/v1/batch`, ~51 KB: over the 32 KB a message may be, as
real SDKs' batches often are, so each message is measured against it),
`batch_segment_browser` (200 events, ~74 KB, in the browser's shape: its key in each
message), `batch_segment_uuid` (`batch_segment` with uuid4-shaped messageIds, as Segment's
SDKs make them: bench/payloads.py). The agent's upstream serves another key than the bench's, so no forwarder runs:
its retries against an offline upstream come at times that depend on valgrind's slowdown,
and would blur the count. For the mapped workloads it must serve the key; it is offline
(a port nothing listens on): its forwarder probes the port every 2 s and, at each
backoff's end, prepares one read's batches (Segment events stored mapped, spliced as
stored: no mapping) and fails to connect, a few times in the measured window (backoff
doubling).
`PYTHONMALLOC` is `malloc`, as `outpost run` chooses on glibc (`--malloc pymalloc` to
compare). Needs valgrind and wrk. `--keep DIR` keeps the callgrind output for
`callgrind_annotate`. Bounded: wrk stops by count, every wait has a timeout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .loadgen import Load, run
from .procs import free_port, http_get, ingested, write_agent_config

WORKLOADS = {  # name -> (wrk payload kind, path, events per request)
    "single": ("segment1", "/v1/track", 1),
    "batch_segment": ("segment", "/v1/batch", 100),
    "batch_nucleus": ("nucleus", "/app/benchapp/track", 100),
    "batch_nucleus_mapped": ("nucleus", "/app/benchapp/track", 100),
    "batch_segment_mapped": ("segment", "/v1/batch", 100),
    "batch_segment_uuid": ("segment_uuid", "/v1/batch", 100),
    "batch_segment_large": ("segment", "/v1/batch", 200),
    "batch_segment_browser": ("segment_browser", "/v1/batch", 200),
}
START_S = 240.0  # python under callgrind starts in 10-60 s


def measure(workdir: Path, workload: str, requests: int, connections: int,
            ref: str | None, malloc: str) -> dict[str, float]:
    kind, path, events = WORKLOADS[workload]
    (workdir / "spool").mkdir(parents=True, exist_ok=True)
    port = free_port()
    out = workdir / "callgrind.out"
    if ref is None:
        mapped = workload.endswith("_mapped")
        cfg = write_agent_config(workdir / "agent.toml", port, workdir / "spool" / "spool.db",
                                 free_port(), "segment-http" if kind == "nucleus" and mapped
                                 else "nucleus-ws")
        if not mapped:
            cfg.write_text(cfg.read_text().replace('keys = ["*"]', 'keys = ["not-the-bench-key"]'))
        server = ["-m", "agent", "run", "--config", str(cfg)]
        probe = "/healthz"
    else:
        server = ["-m", "bench.refservers", ref, "--port", str(port),
                  "--db", str(workdir / "naive.db")]
        probe = "/"
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}", sys.executable, *server]
    env = {**os.environ, "PYTHONMALLOC": malloc}
    with open(workdir / "server.log", "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        while True:
            try:
                http_get(f"http://127.0.0.1:{port}{probe}", timeout=5.0)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() - started > START_S:
                    raise RuntimeError("server did not start:\n"
                                       + (workdir / "server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}{path}"
        run(Load(kind=kind, url=url, events=events, connections=connections, duration=300,
                 max_requests=max(200, requests // 10)), workdir, True)
        # wrk stops by count and abandons the requests still in flight (up to one per
        # connection: 15% of 200 batches), which the server still serves: counted only
        # once served, and only those it served between the switches.
        _quiet(proc.pid)
        before = ingested(port) if ref is None else 0
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True,
                       capture_output=True, timeout=60)
        result = run(Load(kind=kind, url=url, events=events, connections=connections,
                          duration=900, max_requests=requests), workdir, True)
        _quiet(proc.pid)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True,
                       capture_output=True, timeout=60)
        stored = ingested(port) - before if ref is None else 0
    finally:
        proc.terminate()
        proc.wait(300)
    total = sum(_totals(f) for f in workdir.glob("callgrind.out*"))
    # The agent's own count of the events it stored; a reference server's, wrk's replies.
    done = stored / events if stored else result["raw"]["requests"]
    return {"requests": done, "replies": result["raw"]["requests"],
            "errors": result["raw"]["errors_status"],
            "per_request": total / done, "per_event": total / done / events}


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks


def _quiet(pid: int) -> None:
    """Return once the server has used under 2% of a core for a second (at most 60 s):
    the requests in flight are served. Watched from outside, so nothing is counted."""
    hz = os.sysconf("SC_CLK_TCK")
    last = _cpu_ticks(pid)
    for _ in range(60):
        time.sleep(1.0)
        now = _cpu_ticks(pid)
        if now - last < 0.02 * hz:
            return
        last = now


def _totals(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="single",
                   help=f"comma list of: {', '.join(WORKLOADS)}")
    p.add_argument("--requests", type=int, default=0,
                   help="measured requests (default: 2,000 single, 200 batches)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--ref", choices=["hello", "naive"], help="a reference server instead")
    p.add_argument("--malloc", default="malloc", help="PYTHONMALLOC for the server")
    p.add_argument("--keep", type=Path, help="keep the callgrind output under this directory")
    args = p.parse_args()
    for workload in args.workloads.split(","):
        n = args.requests or (2000 if workload == "single" else 200)
        with tempfile.TemporaryDirectory(prefix="outpost-cg-") as tmp:
            workdir = args.keep / workload if args.keep else Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            r = measure(workdir, workload, n, args.connections, args.ref, args.malloc)
        print(f"{workload} ({args.ref or 'agent'}, PYTHONMALLOC={args.malloc}): "
              f"{r['requests']:.0f} requests stored ({r['replies']:.0f} replies), "
              f"{r['errors']:.0f} errors, "
              f"{r['per_request'] / 1000:,.1f}k instructions per request, "
              f"{r['per_event'] / 1000:,.2f}k per event")


if __name__ == "__main__":
    main()
