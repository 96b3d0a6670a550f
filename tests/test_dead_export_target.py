"""`outpost dead export FILE` where FILE is the spool itself, or one of its files: a slip
of the operator's (`outpost dead export spool.db` in /var/lib/outpost) must not replace
the queue with the export."""

from __future__ import annotations

import base64
import json
import os
import resource
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import paths
from agent.families.event import NUCLEUS, Event
from agent.settings import StorageConfig
from agent.spool import Spool
from tests.conftest import AgentProcess, free_port, write_config
from tests.test_cli_mistakes import outpost, planted_links
from tests.test_operator_mistakes import one_line
from tests.waiting import ROOT, run_outpost


def post_event(port: int, key: str = "wk_export_target") -> None:
    """One Segment event posted under ``key``, answered 200 (stored)."""
    auth = base64.b64encode(f"{key}:".encode()).decode()
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
    post_event(port)
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


async def test_dead_export_onto_the_kept_machine_id_is_refused_and_the_id_kept(
        tmp_path: Path) -> None:
    """The id an agent makes where the OS has none, kept beside the spool: an export over
    it (a tab completion in the spool's directory) made the next start replace it, and the
    upstreams took the machine for a new one."""
    spool = tmp_path / "spool.db"
    await (await Spool.open(StorageConfig(path=str(spool)))).close()   # no agent runs
    cfg = write_config(tmp_path / "agent.toml", spool, port=free_port())
    kept = paths.device_id_file(spool)
    kept.write_text("0123456789abcdef0123456789abcdef\n")
    code, out = await run_outpost("dead", "export", str(kept), "--config", str(cfg))
    line = one_line(out)
    assert code == 1 and f"cannot write {kept}:" in line and "machine id" in line, (code, line)
    assert kept.read_text() == "0123456789abcdef0123456789abcdef\n"


async def test_dead_export_does_not_follow_another_users_link_in_a_shared_directory(
        tmp_path: Path) -> None:
    """`outpost dead export /tmp/dead.jsonl` resolved a link planted there with realpath and
    replaced the file it named, or made one where it pointed: as root, any file of the
    machine's, wherever the kernel's protected_symlinks is off (as in this container)."""
    to_file, precious, to_nothing, absent = planted_links(tmp_path)
    spool = tmp_path / "spool.db"
    await (await Spool.open(StorageConfig(path=str(spool)))).close()   # no agent runs
    cfg = write_config(tmp_path / "agent.toml", spool, port=free_port())
    for link in (to_file, to_nothing):
        code, out = await run_outpost("dead", "export", str(link), "--config", str(cfg))
        line = one_line(out)
        assert code == 1 and f"cannot write {link}:" in line, (code, line)
        assert "another user's link" in line, line
    assert precious.read_text() == "mine\n" and not absent.exists()


@pytest.mark.parametrize("target", ["regular file", "device", "-"])
async def test_dead_export_that_cannot_be_written_names_the_target(
        tmp_path: Path, target: str) -> None:
    """An export to a full disk (a file over RLIMIT_FSIZE here; /dev/full) said only
    `outpost: [Errno 28] No space left on device` (or `[Errno 27] File too large`): not what
    could not be written, nor that a file it would replace is left as it was."""
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    try:
        await spool.append([Event("k", NUCLEUS, 1, b'{"id":1,"pad":"%s"}' % (b"x" * 200_000))])
        rows = await spool.fetch(spool.streams["k"].id, 0, 10)
        await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
    finally:
        await spool.close()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=free_port())
    out = tmp_path / "dead.jsonl"
    out.write_text("kept\n")
    name = {"regular file": str(out), "device": "/dev/full", "-": "-"}[target]

    def small_files() -> None:   # a disk full once 100 KB are written: the export is 200 KB
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    with open("/dev/full", "wb") as full:
        run = subprocess.run([sys.executable, "-m", "agent", "dead", "export", name, "--config",
                              str(cfg)], cwd=ROOT, stdout=full if name == "-" else None,
                             stderr=subprocess.PIPE, text=True, timeout=30,
                             preexec_fn=small_files if target == "regular file" else None)  # noqa: PLW1509
    line = one_line(run.stderr)
    assert run.returncode == 1 and "Errno" not in line, (run.returncode, line)
    want = {"regular file": f"cannot write {out}: File too large; {out} is unchanged",
            "device": "cannot write /dev/full: No space left on device",
            "-": "cannot write the output: No space left on device"}[target]
    assert want in line, line
    assert out.read_text() == "kept\n" and os.listdir(tmp_path).count("dead.jsonl") == 1
