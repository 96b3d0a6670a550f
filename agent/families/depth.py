"""How deep an event may nest: no deeper than it can still be written once mapped to the
other family, so that it is refused at ingest, never dead-lettered at its first send.

orjson writes 254 levels of objects and arrays; mapping to the other family puts an
event's own fields up to 2 levels deeper (`context.nucleus`, `payload.$segment`), and one
level is kept spare. The event object itself is level 1.
"""

from __future__ import annotations

from typing import Any

WRITABLE = 254
MAX_DEPTH = WRITABLE - 3


def may_be_too_deep(body: bytes) -> bool:
    """Whether JSON ``body`` holds enough `{` and `[` to nest past MAX_DEPTH, so the usual
    event pays no walk: each level takes two bytes, so a body shorter than that needs no
    count either (the byte counts cost a 250-byte event ~5k instructions, callgrind)."""
    return len(body) > 2 * MAX_DEPTH + 1 and body.count(b"{") + body.count(b"[") > MAX_DEPTH


def first_hit(value: Any, hit: type | tuple[type, ...] = (), most: int = MAX_DEPTH
              ) -> tuple[str, Any] | None:
    """(path, item) of the first item of ``value``, in document order, that is of type
    ``hit`` (a reader's marker for a value that cannot be kept), or a container more
    than ``most`` levels deep (item None); None when there is none.

    Each step is kept once, with its parent's index, and a path is spelled out only for
    the hit: a path string per node grew as a long name times a long list under it
    (review: 400 MB for a 60 KB body)."""
    steps: list[tuple[int, str | int]] = []    # (parent step or -1, member name or index)
    stack: list[tuple[Any, int, int]] = [(value, -1, 1)]
    while stack:
        item, at, level = stack.pop()
        if isinstance(item, hit):
            return _spelled(steps, at), item
        if isinstance(item, dict):
            children: Any = item.items()
        elif isinstance(item, list):
            children = enumerate(item)
        else:
            continue
        if level > most:
            return _spelled(steps, at), None
        for step, child in reversed(list(children)):
            steps.append((at, step))
            stack.append((child, len(steps) - 1, level + 1))
    return None


def too_deep(value: Any) -> str | None:
    """Why ``value`` (an event) nests too deep, naming where; None when it does not."""
    found = first_hit(value)
    if found is None:
        return None
    return f"{shortened(found[0] or 'the event', 100)}: nested deeper than {MAX_DEPTH} levels"


def shortened(text: str, most: int) -> str:
    return text if len(text) <= most else f"{text[:most - 3]}..."


def _spelled(steps: list[tuple[int, str | int]], at: int) -> str:
    parts: list[str] = []
    while at >= 0:
        at, step = steps[at]
        parts.append(f"[{step}]" if isinstance(step, int) else f".{step}")
    return "".join(reversed(parts)).lstrip(".")
