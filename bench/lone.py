"""Disk per event when each commit holds one event: `python -m bench.lone [--events N]`.

The backlog rows fill with 100-event batches at full speed, so each record packs a whole
request, or several. A quiet device's apps post an event at a time (analytics.js sends
one call a request), and each commit then packs one event: this posts ``--events`` single
events, one request after the other, round-robin from ``KEYS`` apps, to an agent whose
upstream is offline, and reports the spool file's growth (file + ``-wal``, once the agent
has stopped) per event against the event's raw JSON, for each family in its own route and
upstream (Segment `/v1/track` to `segment-http`, Nucleus messages to `nucleus-ws`).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import tempfile
from pathlib import Path
from typing import Any

from .harness import depth
from .meters import spool_bytes
from .payloads import NUCLEUS_EVENT, SEGMENT_EVENT
from .procs import agent_proc, free_port, write_agent_config

KEYS = 4   # apps posting in turn: each commit holds one key's one event
KINDS = ("segment", "nucleus")


def _request(kind: str, i: int) -> tuple[str, bytes, bytes, dict[str, str]]:
    """Path, body, the event's raw JSON, headers of single-event post ``i``."""
    app = f"app{i % KEYS}"
    if kind == "segment":
        event = (SEGMENT_EVENT % (i, 7)).encode()
        auth = base64.b64encode(f"{app}:".encode()).decode()
        return "/v1/track", event, event, {"Authorization": f"Basic {auth}"}
    event = (NUCLEUS_EVENT % (i, 7)).encode()
    return f"/app/{app}/track", b'{"data":[' + event + b"]}", event, {}


def lone(workdir: Path, kind: str, events: int) -> dict[str, Any]:
    """``events`` single-event posts of ``kind`` ("segment" or "nucleus"), one at a time."""
    d = workdir / f"lone-{kind}"
    (d / "spool").mkdir(parents=True, exist_ok=True)
    spool = d / "spool" / "spool.db"
    port = free_port()
    cfg = write_agent_config(d / "agent.toml", port, spool, free_port(),
                             "segment-http" if kind == "segment" else "nucleus-ws")
    # The empty spool as a stopped agent leaves it: its schema checkpointed into the file
    # (measured while running, it is in the -wal too, and counted twice).
    agent_proc(cfg, port, d / "agent.log").start().stop()
    empty = spool_bytes(spool)
    agent = agent_proc(cfg, port, d / "agent.log").start()
    raw = 0
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for i in range(events):
            path, body, event, headers = _request(kind, i)
            conn.request("POST", path, body, {"Content-Type": "application/json", **headers})
            reply = conn.getresponse()
            reply.read()
            if reply.status != 200:
                raise RuntimeError(f"{path}: HTTP {reply.status}")
            raw += len(event)
        conn.close()
        queued = depth(port)
    finally:
        agent.stop()
    grown = spool_bytes(spool) - empty
    return {"events": events, "queued": queued, "keys": KEYS, "bytes": grown,
            "bytes_per_event": grown / max(queued, 1), "raw_bytes_per_event": raw / events}


def line(kind: str, r: dict[str, Any]) -> str:
    return (f"  lone {kind} events: {r['queued']:,} from {r['keys']} apps, one a request: "
            f"{r['bytes_per_event']:.0f} B an event on disk, raw JSON "
            f"{r['raw_bytes_per_event']:.0f} B "
            f"({r['bytes_per_event'] / r['raw_bytes_per_event']:.2f}×)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=5_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="outpost-lone-") as tmp:
        for kind in KINDS:
            print(line(kind, lone(Path(tmp), kind, args.events)), flush=True)


if __name__ == "__main__":
    main()
