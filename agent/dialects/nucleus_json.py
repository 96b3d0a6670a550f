"""Reading a Nucleus `{"data": [...]}` message so that one bad event refuses itself alone.

A module resends its whole unacknowledged queue in every message, so a message refused
for one event (a lone surrogate, as nucleus-nodejs writes for a sliced emoji; NaN, as
Python's json.dumps writes; an integer a double would round) was refused again with every
later event of the app. orjson reads the usual message; only one it refuses, or one that
may hold a wide integer or a -0 (a bytes-level check), is read again by the standard library,
which reads all three, with each such value left as a marker: the events holding one are
named, by position, with the reason, and the family leaves them out of the acks. A body
that is not JSON even so is still refused whole. The reading is every batch's
(batch_json.py).
"""

from __future__ import annotations

from typing import Any

from agent.dialects import batch_json


def read(raw: bytes | str) -> tuple[Any, dict[int, str]]:
    """The message, and why each event of it that cannot be kept cannot, by its index in
    `data`. Raises BodyError(400) for a body that is not JSON. The rest of a message is
    never stored: a value there is not a reason to refuse it."""
    return batch_json.read(raw, "data", envelope=False)
