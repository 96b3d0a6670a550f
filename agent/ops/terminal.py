"""Text from apps and upstreams, made safe to print on an operator's terminal.

An app's event id or an upstream's error text may hold escape sequences that a terminal
obeys (clear the screen, set the window title, recolour what follows): every command
prints such values through ``printable``, or its JSON through ``printable_json``.
"""

from __future__ import annotations

import re

# C0, DEL and C1 (Unicode category Cc): a terminal acts on them instead of showing them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What JSON leaves unescaped of them: DEL and C1 (json.dumps escapes C0 itself).
_JSON_CONTROL = re.compile(r"[\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or f"\\x{ord(c):02x}"


def printable(text: str) -> str:
    """``text`` with each control character shown as an escape (``\\x1b``, ``\\n``)."""
    return _CONTROL.sub(_escape, text)


def printable_json(text: str) -> str:
    """JSON text with DEL and C1 characters as ``\\u00XX`` escapes: still the same JSON."""
    return _JSON_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
