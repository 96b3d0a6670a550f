"""The code style the project holds itself to: mypy --strict and ruff, as configured
in pyproject.toml, over the whole tree."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_mypy_strict_is_clean() -> None:
    out = run("mypy")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_is_clean() -> None:
    out = run("ruff", "check", "agent", "tests", "bench")
    assert out.returncode == 0, out.stdout + out.stderr
