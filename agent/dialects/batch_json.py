"""Reading a batch so that one item holding a value JSON cannot carry refuses itself alone.

Python's json.dumps writes NaN, Infinity and integers a double would round; JavaScript
writes a lone surrogate ("\\ud83d") for a string cut inside an emoji. A batch refused for
one such value lost every item sent with it: SDKs drop a refused batch, and a Nucleus
module resends its whole unacknowledged queue in every message. orjson reads the usual
batch; only one it refuses, or one that may hold a wide integer or a -0 (a bytes-level
check), is read again (a -0 as -0.0), with each such value left as a marker
(exact_json.read_marked; relaxed_json for a hand-written body): each item holding one is named, by its index, with the reason, and
is never stored or changed. A value outside the items (a batch-level `context`, merged
into every message) refuses the body whole, as does a body that is not JSON even so.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from agent.dialects import exact_json, relaxed_json
from agent.dialects.body import BodyError
from agent.dialects.exact_json import may_be_inexact, refuse_unkept, unkept, unkept_error


class Read(NamedTuple):
    """A batch as read, and why each item of it that cannot be kept cannot, by index."""

    body: Any
    faults: dict[int, str]


def read(raw: bytes | str, field: str, *, lenient: bool = False,
         envelope: bool = True) -> Read:
    """``raw``, a body whose items are the array ``field``. ``lenient``: it may be written
    by hand (relaxed_json). ``envelope``: a value outside the items that cannot be kept
    refuses the body (False where the rest of the body is never stored: Nucleus).
    Raises BodyError(400) for a body that is not JSON."""
    if not raw:
        raise BodyError(400, "empty body: expected JSON")
    data = raw.encode() if isinstance(raw, str) else raw
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        body = relaxed_json.reread(data) if lenient else exact_json.reread(data, str(exc))
    else:
        if not may_be_inexact(data):
            return Read(body, {})
        body = exact_json.reread(data, "")
    items = body.get(field) if isinstance(body, dict) else None
    if envelope:
        _refuse_envelope(body, field)
    if not isinstance(items, list):
        return Read(body, {})   # the family refuses it whole, naming why
    faults = {}
    for i, item in enumerate(items):
        if (fault := _fault(f"{field}[{i}]", item)) is not None:
            faults[i] = fault
    return Read(body, faults)


def _refuse_envelope(body: Any, field: str) -> None:
    refuse_unkept({k: v for k, v in body.items() if k != field}
                  if isinstance(body, dict) else body)


def _fault(where: str, item: Any) -> str | None:
    found = unkept(item)
    if found is None:
        return None
    path, marker = found
    return unkept_error(f"{where}{'' if not path or path[0] == '[' else '.'}{path}", marker)
