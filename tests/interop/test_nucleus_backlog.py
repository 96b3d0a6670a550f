"""The real npm `nucleus-nodejs` 3.0.9 module with a backlog larger than one message may be.

The module keeps its queue with no cap and sends the whole of it in one websocket frame
every tick. After the agent was away, 11,000 queued events make a 5.9 MB frame: it was
closed with 1009 (over 4 MiB), uncounted, and resent, growing, tick after tick: nothing of
that app was delivered again. The queue must drain, every event delivered once, including
those whose ids collide with others in the queue (the module drops every queued event whose
id is acknowledged).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus

NODE_DIR = Path(__file__).parent / "node"
pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
              pytest.mark.skipif(not (NODE_DIR / "node_modules" / "nucleus-nodejs").exists(),
                                 reason="run `npm ci --prefix tests/interop/node` first")]

MB = 1024 * 1024
EVENTS = 11_000
LABELS = ["plain", "café", "emoji 🚀", 'quote "q"']   # as nucleus_backlog.js names them


async def run_backlog(endpoint: str, events: int, seconds: float, home: Path) -> list[str]:
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    proc = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "nucleus_backlog.js"), endpoint, "backlog-app", str(events),
        str(seconds), cwd=NODE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    assert proc.returncode == 0, out.decode()[-2000:]
    return out.decode().splitlines()


async def test_a_backlog_over_4_mib_drains_every_event_delivered_once(
        tmp_path: Path, agent_process: Any) -> None:
    fake = await FakeNucleus().start()
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[{
        "name": "nucleus", "protocol": "nucleus-ws", "url": fake.url, "flush_interval_s": 0.2,
        "timeout_s": 5}])
    agent = agent_process(cfg, port).start()
    try:
        lines = await run_backlog(f"ws://127.0.0.1:{port}", EVENTS, 60, tmp_path)
        frames = [int(line.split()[1]) for line in lines if line.startswith("SENT ")]
        closes = [line for line in lines if line.startswith("CLOSE ")]
        assert frames and frames[0] > 5 * MB, f"the module's first frame: {frames[:1]} bytes"
        assert lines[-1] == "DRAINED", (lines[-1], closes[:3], frames)
        assert not closes, closes   # acknowledged, never closed

        # Every event the module queued arrives upstream, once.
        expected = Counter([f"evt-{i} {LABELS[i % len(LABELS)]}" for i in range(EVENTS)])
        expected[None] += 1   # the init event
        deadline = asyncio.get_running_loop().time() + 60
        while len(fake.events) < EVENTS + 1:
            assert asyncio.get_running_loop().time() < deadline, (
                f"{len(fake.events)} of {EVENTS + 1} events delivered")
            await asyncio.sleep(0.1)
        assert Counter(ev.get("name") for ev in fake.events) == expected
    finally:
        agent.terminate()
        await fake.stop()
    log = agent.log.read_text()
    assert "Traceback" not in log, log[-3000:]
