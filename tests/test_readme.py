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


def test_the_readme_install_command_does_not_pip_install_into_the_system_python() -> None:
    """Debian 12, Ubuntu 23.04 and later mark their Python externally managed (PEP 668):
    `python3 -m pip install .` there stops at `error: externally-managed-environment`, and
    the README's first command did nothing on such a fresh machine. It installs into a venv
    of its own, as docs/operations.md's Install does, and runs that venv's `outpost`."""
    install, _ = readme_commands()
    steps = [step.strip() for step in install.split("&&")]
    made = re.fullmatch(r"python3 -m venv (\S+)", steps[0])
    assert made, install
    venv = made[1]
    assert steps[1:] == [f"{venv}/bin/pip install .",
                         f"{venv}/bin/outpost run --config agent.toml"], install


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
