"""The device facts that init and error events carry (agent/device.py detects them)."""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

# The longest fact: an id or a version is a few dozen characters. Each is filled into
# every init and error event, and a machineId into each Segment event mapped to Nucleus
# that names no device: bounded, what it adds stays within the mapping's growth allowance
# (server/limits.py), which ingest's size check relies on.
MAX_FACT_CHARS = 128

# What no fact holds: control characters (a tab, CR, LF, ESC, NEL among them), and
# Unicode's line and paragraph separators. Not str.isprintable(): it also refuses a
# no-break space, a zero-width joiner, a direction mark, and every character newer than
# Python's Unicode tables, which a name or version may hold (shown escaped, as any text).
_BREAKING = frozenset({"Cc", "Zl", "Zp"})


def fact_problem(value: str) -> str | None:
    """What makes ``value`` no fact to send (agent.toml's [device] values and the ones read
    from the machine alike), else None."""
    if len(value) > MAX_FACT_CHARS:
        return f"must be at most {MAX_FACT_CHARS} characters, got {len(value)}"
    categories = set(map(unicodedata.category, value))
    if not _BREAKING.isdisjoint(categories):
        return f"must hold no line breaks or control characters, got {value!r}"
    # A lone surrogate: a byte of no UTF-8 the OS gave (os.uname's, as Python decodes
    # them). No event can carry one: orjson and SQLite refuse it.
    if "Cs" in categories:
        return f"must be UTF-8 text, got {value!r}"
    return None


@dataclass(frozen=True)
class DeviceFacts:
    """The facts filled into events that leave them out."""

    platform: str
    osVersion: str
    totalRam: float
    language: str
    arch: str
    machineId: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
