"""Every option of every `outpost` command is in the docs: README.md and docs/*.md name
it in a paragraph that names its command (`outpost service uninstall --dry-run` was in
`--help` alone)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from agent.cli import build_parser
from tests.conftest import ROOT


def _paragraphs() -> list[str]:
    text = "\n\n".join(p.read_text() for p in [ROOT / "README.md",
                                                *sorted((ROOT / "docs").glob("*.md"))])
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[str, str]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subs:
        for name, sub in subs[0].choices.items():
            yield from _options(sub, (*path, name))
        return
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                yield " ".join(path), option


@pytest.mark.parametrize("command,option", sorted(set(_options(build_parser()))))
def test_every_command_option_is_documented(command: str, option: str) -> None:
    # Named whole (`outpost dead list`), or as the paragraph after its example does
    # ("`list` takes `--reason R`, `--limit N`").
    named = re.compile(rf"outpost {command}\b|`{command.split()[-1]}` takes")
    assert any(named.search(para) and option in para for para in _paragraphs()), \
        f"outpost {command} {option} is in --help alone"
