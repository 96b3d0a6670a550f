"""An old Nucleus module's events (an `event` key naming an error, or a nucleus:* type)
stored by the previous release (82ec193) and resent after the upgrade, their ack lost when
the agent stopped, are known as resends: the dedupe key of an event without `type` reads its
type as that release did."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import free_port, write_config
from tests.segment_helpers import call

OLD = "82ec193"
EVENTS = [{"event": "error:TypeError", "id": 7, "sessionId": 1, "machineId": "m1",
           "date": "2026-01-01T00:00:00.000Z", "payload": {"message": "x"}},
          {"event": "nucleus:userid", "id": 8, "sessionId": 1, "machineId": "m1",
           "date": "2026-01-01T00:00:00.000Z", "payload": "u-1"},
          {"event": "Clicked", "id": 9, "sessionId": 1, "machineId": "m1",
           "date": "2026-01-01T00:00:00.000Z"}]


def old_tree(tmp_path: Path) -> Path:
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "old"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(root), "archive", OLD], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


async def test_an_old_event_resent_across_the_upgrade_is_stored_once(
        make_agent: Any, tmp_path: Path) -> None:
    spool = tmp_path / "spool.db"
    port = free_port()
    cfg = write_config(tmp_path / "old.toml", spool, port=port)
    tree = old_tree(tmp_path)
    log = open(tmp_path / "old.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                            cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not re.search(rf"listening on \S+:{port}\b",
                            (tmp_path / "old.log").read_text(errors="replace")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        r = await call(port, "/app/k/track", {"data": EVENTS})
        assert r.status == 200, r.body
    finally:
        proc.terminate()
        proc.wait(20)
    agent = await make_agent(spool=spool)
    before = agent.spool.depth
    assert before == 3   # all three stored by the old release
    r = await call(agent.port, "/app/k/track", {"data": EVENTS})   # the module resends
    assert r.status == 200, r.body
    assert orjson.loads(r.body)["reportedIds"] == [7, 8, 9]
    assert agent.spool.depth == before, agent.spool.counters
