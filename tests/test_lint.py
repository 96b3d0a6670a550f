"""The code style the project holds itself to: mypy --strict, ruff and the import-linter
contracts, as configured in pyproject.toml, over the whole tree; and an import graph at most
eight floors deep. .pre-commit-config.yaml runs the same three commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

from tests.conftest import ROOT

MAX_FLOORS = 8


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_mypy_strict_is_clean() -> None:
    out = run("mypy")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_is_clean() -> None:
    out = run("ruff", "check", "agent", "tests", "bench")
    assert out.returncode == 0, out.stdout + out.stderr


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    # import-linter has no `python -m` entry point: run the script installed next to python.
    # It puts its working directory first on sys.path, so it checks the `agent` found there.
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe is not None, "lint-imports is missing: pip install -e '.[test]'"
    return subprocess.run([exe, "--no-cache", "--no-logo"], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)


def test_import_contracts_are_kept() -> None:
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(("module", "bad_import", "contract"), [
    ("agent/families/event.py", "from agent.spool import types", "Layers, top to bottom"),
    ("agent/uplinks/base.py", "from agent.dialects import body", "Layers, top to bottom"),
    ("agent/server/intake.py", "from agent.ops import notify", "Layers, top to bottom"),
    ("agent/families/facts.py", "import aiohttp", "No HTTP below the APIs"),
    ("agent/logs.py", "import yarl", "No HTTP below the APIs"),
    ("agent/families/facts.py", "import sqlite3", "No storage in families"),
    ("agent/server/guard.py", "from agent.forwarder import backoff", "Ingest does not know delivery"),
    ("agent/ops/notify.py", "from agent.forwarder import supervisor", "Ops has narrow inputs"),
    ("agent/dialects/capture.py", "from agent.dialects import tranthor", "One file per local API"),
    ("agent/uplinks/segment_http.py", "from agent.uplinks import nucleus_ws",
     "One file per upstream protocol"),
    ("agent/forwarder/stream.py", "from agent.uplinks import nucleus_http",
     "Uplinks are reached through their registry"),
    ("agent/server/app.py", "from agent.dialects import capture",
     "Dialects are reached through their registry"),
    ("agent/sync/policy.py", "import psutil", "The transmit policy is pure"),
    ("agent/sync/power.py", "from agent.sync.metered import none", "One job each in sync"),
    ("agent/sync/metered/none.py", "from agent.sync.metered import networkmanager",
     "One file per metered source"),
])
def test_each_contract_catches_a_wrong_import(
        tmp_path: Path, module: str, bad_import: str, contract: str) -> None:
    shutil.copytree(ROOT / "agent", tmp_path / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as source:
        source.write(f"\n{bad_import}  # a wrong import\n")
    out = lint_imports(tmp_path)
    broken = [line for line in out.stdout.splitlines() if " BROKEN" in line]
    assert out.returncode == 1 and broken and all(line.startswith(contract) for line in broken), (
        out.stdout + out.stderr)


def floor(module: str) -> str:
    """The floor a module lives on: its top-level module or package under agent."""
    return ".".join(module.split(".")[:2])


def known_violations() -> set[tuple[str, str]]:
    """The imports the contracts still ignore: issue 10's other changes remove them, and the
    lead deletes them from pyproject.toml, so this test then measures the real graph."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pairs = set()
    for contract in config["tool"]["importlinter"]["contracts"]:
        for expression in contract.get("ignore_imports", []):
            importer, imported = expression.split(" -> ")
            pairs.add((importer, imported))
    return pairs


def deepest_chain(graph: grimp.ImportGraph, skip: set[tuple[str, str]]) -> tuple[int, list[str]]:
    """The runtime import chain that crosses the most floors (consecutive modules of one
    package are one floor, re-entering a package is another), as (floors, modules)."""
    best: dict[str, tuple[int, list[str]]] = {}
    visiting: list[str] = []

    def walk(module: str) -> tuple[int, list[str]]:
        if module in best:
            return best[module]
        assert module not in visiting, "import cycle: " + " -> ".join(
            visiting[visiting.index(module):] + [module])
        visiting.append(module)
        result = (1, [module])
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if (module, imported) in skip:
                continue
            floors, chain = walk(imported)
            floors += floor(imported) != floor(module)
            if floors > result[0]:
                result = (floors, [module, *chain])
        visiting.pop()
        best[module] = result
        return result

    return max((walk(module) for module in sorted(graph.modules)), key=lambda found: found[0])


def test_import_graph_is_at_most_eight_floors_deep() -> None:
    # Imports made only for type checking cost nothing at run time and are left out.
    graph = grimp.build_graph("agent", exclude_type_checking_imports=True, cache_dir=None)
    floors, chain = deepest_chain(graph, known_violations())
    assert floors <= MAX_FLOORS, (
        f"{floors} floors (at most {MAX_FLOORS}): " + " -> ".join(chain))


def test_depth_check_sees_a_deep_chain() -> None:
    # The measure itself: a chain down through every floor of a made-up graph, re-entering one.
    graph = grimp.ImportGraph()
    chain = ["agent.__main__", "agent.cli", "agent.service", "agent.server.app", "agent.dialects.x",
             "agent.server.intake", "agent.spool", "agent.spool.store", "agent.families.event",
             "agent.clock"]
    for importer, imported in zip(chain, chain[1:]):
        graph.add_import(importer=importer, imported=imported)
    graph.add_import(importer="agent.cli", imported="agent.clock")
    assert deepest_chain(graph, set()) == (9, chain)
    assert deepest_chain(graph, {("agent.dialects.x", "agent.server.intake")}) == (
        5, ["agent.__main__", "agent.cli", "agent.service", "agent.server.app", "agent.dialects.x"])
    graph.add_import(importer="agent.clock", imported="agent.cli")
    with pytest.raises(AssertionError, match="import cycle: agent.cli -> agent.clock -> agent.cli"):
        deepest_chain(graph, set())
