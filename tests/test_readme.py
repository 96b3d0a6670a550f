"""The README's two commands stay true: CI runs the test command verbatim, and the
installed `outpost run --config agent.toml` serves with the default config."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    install, test = readme_commands()
    assert "pip install" in install and "outpost run --config agent.toml" in install
    assert "pytest" in test
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines


def test_installed_outpost_runs_the_default_config(tmp_path: Path) -> None:
    exe = shutil.which("outpost", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the outpost console script is not installed in this environment")
    env = {**os.environ, "OUTPOST_SYSTEM": "0", "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("OUTPOST_CONFIG", None)
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "run", "--config", "agent.toml"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "listening on 127.0.0.1:8765" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        req = urllib.request.Request("http://127.0.0.1:8765/app/readme/track", method="POST",
                                     data=b'{"data":[{"type":"event","name":"x","id":1}]}')
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200 and resp.read() == b'{"reportedIds":[1]}'
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    spool = tmp_path / "data" / "outpost" / "spool.db"
    assert spool.exists(), "the default spool lives in the platformdirs user data dir"
