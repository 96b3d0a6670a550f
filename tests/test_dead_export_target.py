"""`outpost dead export FILE` where FILE is the spool itself, or one of its files: a slip
of the operator's (`outpost dead export spool.db` in /var/lib/outpost) must not replace
the queue with the export."""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

from agent.settings import StorageConfig
from agent.spool import Spool
from tests.conftest import AgentProcess, free_port, write_config
from tests.test_cli_mistakes import outpost
from tests.test_operator_mistakes import one_line
from tests.waiting import run_outpost


def _post_event(port: int) -> None:
    auth = base64.b64encode(b"wk_export_target:").decode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/track", method="POST",
                                 data=json.dumps({"event": "kept", "userId": "u"}).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def _refused(run_dir: Path, cfg: Path, target: str) -> None:
    run = outpost("dead", "export", target, "--config", str(cfg), cwd=run_dir)
    line = one_line(run.stdout + run.stderr)
    assert run.returncode == 1 and run.stderr.strip() == line, (run.returncode, line)
    assert "storage.path" in line and f"cannot write {Path(target)}:" in line, line


def test_dead_export_onto_the_spool_or_its_wal_is_refused_and_the_queue_kept(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """It replaced the spool with the export: an agent running kept writing to the file it
    had open, gone at its stop; a stopped agent's queue was gone at once. Either way the
    acknowledged events were lost, and the next start found a spool it could not read."""
    spool, port = tmp_path / "spool.db", free_port()
    cfg = write_config(tmp_path / "agent.toml", spool, port=port)
    agent = agent_process(cfg, port).start()
    _post_event(port)
    for name in ("spool.db", "spool.db-wal", "./spool.db"):
        _refused(tmp_path, cfg, name)
    assert agent.terminate() == 0
    _refused(tmp_path, cfg, "spool.db")   # no agent: the export reads the spool itself
    status = outpost("status", "--json", "--config", str(cfg))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["queue_depth"] == 1, status.stdout


async def test_dead_export_onto_the_config_file_is_refused_and_the_config_kept(
        tmp_path: Path) -> None:
    """`outpost dead export agent.toml` (a tab completion in /etc/outpost): the config, keys
    and all, was replaced by the letters, and the agent's next start or reload failed."""
    spool = tmp_path / "spool.db"
    await (await Spool.open(StorageConfig(path=str(spool)))).close()   # no agent runs
    cfg = write_config(tmp_path / "agent.toml", spool, port=free_port())
    before = cfg.read_bytes()
    code, out = await run_outpost("dead", "export", str(cfg), "--config", str(cfg))
    line = one_line(out)
    assert code == 1 and f"cannot write {cfg}:" in line and "config" in line, (code, line)
    assert cfg.read_bytes() == before
