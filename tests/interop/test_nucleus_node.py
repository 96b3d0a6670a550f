"""The real npm `nucleus-nodejs` 3.0.9 module against a real agent process.

The app sends while the agent's upstream is offline; the agent is restarted;
the upstream comes back; every event arrives upstream as the app sent it,
plus the device facts the agent fills in.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.waiting import wait_for

NODE_DIR = Path(__file__).parent / "node"
pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
              pytest.mark.skipif(not (NODE_DIR / "node_modules" / "nucleus-nodejs").exists(),
                                 reason="run `npm ci --prefix tests/interop/node` first")]

FACTS = {"platform", "osVersion", "totalRam", "language", "locale", "arch", "machineId"}


async def run_app(endpoint: str, app_id: str, events: int, seconds: float,
                  home: Path) -> tuple[dict[Any, dict[str, Any]], set[Any]]:
    """Run the node app; returns (events it sent by id, ids the agent acknowledged)."""
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    proc = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "nucleus_app.js"), endpoint, app_id, str(events), str(seconds),
        cwd=NODE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    sent: dict[Any, dict[str, Any]] = {}
    acked: set[Any] = set()
    for line in out.decode().splitlines():
        if line.startswith("SENT "):
            for ev in json.loads(line[5:])["data"]:
                if ev.get("type") != "heartbeat":
                    sent[ev["id"]] = ev
        elif line.startswith("RECV "):
            acked.update(json.loads(line[5:]).get("reportedIds", []))
    assert proc.returncode == 0, out.decode()[-2000:]
    return sent, acked


async def test_nucleus_nodejs_offline_restart_then_delivered(tmp_path: Path,
                                                             agent_process: Any) -> None:
    fake = await FakeNucleus().start()
    await fake.go_down()  # the upstream is offline while the app sends
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[{
        "name": "nucleus", "protocol": "nucleus-ws", "url": fake.url, "flush_interval_s": 0.2,
        "timeout_s": 5}])
    agent = agent_process(cfg, port).start()

    sent, acked = await run_app(f"ws://127.0.0.1:{port}", "interop-app", 25, 5, tmp_path)
    assert len(sent) == 27  # init + 25 events + error (setUserId before init sends nothing)
    assert set(sent) == acked, "the agent acknowledged every event the module sent"

    assert agent.terminate() == 0          # restart the agent...
    await fake.come_back()                 # ...and bring the upstream back
    agent = agent_process(cfg, port).start()
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while {ev["id"] for ev in fake.events} != set(sent):
            assert asyncio.get_running_loop().time() < deadline, "not everything arrived"
            await asyncio.sleep(0.1)
    finally:
        agent.terminate()
        await fake.stop()

    assert fake.paths[0] == "/app/interop-app/track"
    by_id = {ev["id"]: ev for ev in fake.events}
    assert len(fake.events) == len(sent), "each event delivered once"
    for ev_id, app_ev in sent.items():
        up = by_id[ev_id]
        for key, value in app_ev.items():
            if value is not None:
                assert up[key] == value, f"{key} changed for event {ev_id}"
        added = {k for k, v in up.items() if v is not None and app_ev.get(k) is None}
        if app_ev["type"] in ("init", "error"):
            assert added <= FACTS, added
            assert FACTS <= set(up) and all(up[k] is not None for k in FACTS)
        else:
            assert not added, f"non-init events gain nothing, got {added}"
    # Ids are small random integers; echoed back as integers (type-strict filter).
    assert all(isinstance(i, int) for i in acked)


async def test_nucleus_nodejs_with_a_trailing_slash_on_its_endpoint(
        tmp_path: Path, make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """`endpoint: 'ws://127.0.0.1:PORT/'` makes the module open `//app/{appId}/track`:
    served as `/app/{appId}/track`, not a 404 it retries forever."""
    agent = await make_agent(upstreams=[{
        "name": "nucleus", "protocol": "nucleus-ws", "url": fake_nucleus.url,
        "flush_interval_s": 0.2, "timeout_s": 5}])
    sent, acked = await run_app(f"ws://127.0.0.1:{agent.port}/", "slash-app", 3, 4, tmp_path)
    assert len(sent) == 5  # init + 3 events + error
    assert set(sent) == acked, "the agent acknowledged every event the module sent"
    await wait_for(lambda: sorted(fake_nucleus.ids()) == sorted(sent))
