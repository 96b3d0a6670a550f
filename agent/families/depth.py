"""How deep an event may nest: no deeper than it can still be written once mapped to the
other family, so that it is refused at ingest, never dead-lettered at its first send.

orjson writes 254 levels of objects and arrays; mapping to the other family puts an
event's own fields up to 2 levels deeper (`context.nucleus`, `payload.$segment`), and one
level is kept spare. The event object itself is level 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

WRITABLE = 254
MAX_DEPTH = WRITABLE - 3
# Each level takes two bytes: a body no longer than this cannot nest past MAX_DEPTH.
# Hot loops test it before calling may_be_too_deep: a call is ~600 instructions an event.
SHALLOW_BYTES = 2 * MAX_DEPTH + 1


def may_be_too_deep(body: bytes) -> bool:
    """Whether JSON ``body`` holds enough `{` and `[` to nest past MAX_DEPTH, so the usual
    event pays no walk: each level takes two bytes, so a body shorter than that needs no
    count either (the byte counts cost a 250-byte event ~5k instructions, callgrind)."""
    return len(body) > SHALLOW_BYTES and body.count(b"{") + body.count(b"[") > MAX_DEPTH


def first_hit(value: Any, hit: type | tuple[type, ...] = (), most: int = MAX_DEPTH
              ) -> tuple[str, Any] | None:
    """(path, item) of the first item of ``value``, in document order, that is of type
    ``hit`` (a reader's marker for a value that cannot be kept), or a container more
    than ``most`` levels deep (item None); None when there is none.

    Walked with one iterator open per level and the steps to the current one, so that
    its memory follows the depth, not the size: a step kept for every node (and every
    sibling pushed at once) took ~300 bytes a node, 590 MB for one 4 MiB event of `{}`
    (review); a path string per node, 400 MB for a 60 KB body (review before)."""
    if isinstance(value, hit):
        return "", value
    top = _children(value)
    if top is None:
        return None
    if most < 1:
        return "", None
    path: list[str | int] = []           # the step to each open level but the first
    open_: list[Iterator[tuple[str | int, Any]]] = [top]
    while open_:
        for step, child in open_[-1]:
            if isinstance(child, hit):
                return _spelled([*path, step]), child
            below = _children(child)
            if below is not None:
                if len(open_) >= most:   # the child is at level len(open_) + 1
                    return _spelled([*path, step]), None
                path.append(step)
                open_.append(below)
                break
        else:
            open_.pop()
            if path:
                path.pop()
    return None


def _children(item: Any) -> Iterator[tuple[str | int, Any]] | None:
    if isinstance(item, dict):
        return iter(item.items())
    if isinstance(item, list):
        return enumerate(item)
    return None


def too_deep(value: Any) -> str | None:
    """Why ``value`` (an event) nests too deep, naming where; None when it does not."""
    found = first_hit(value)
    if found is None:
        return None
    return f"{shortened(found[0] or 'the event', 100)}: nested deeper than {MAX_DEPTH} levels"


def shortened(text: str, most: int) -> str:
    return text if len(text) <= most else f"{text[:most - 3]}..."


def _spelled(steps: list[str | int]) -> str:
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}"
                   for step in steps).lstrip(".")
