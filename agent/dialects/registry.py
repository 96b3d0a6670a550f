"""Every local API the agent serves: one line per dialect, in route-priority order.

A new API is one module exporting a ``DIALECT`` record (agent/dialects/base.py) plus
one line here; agent/server/app.py serves each one's routes, guarded and admitted.
"""

from __future__ import annotations

from agent.dialects import capture, nucleus, segment, segmentstream, tranthor
from agent.dialects.base import Dialect

DIALECTS: tuple[Dialect, ...] = (
    segment.DIALECT,
    capture.DIALECT,
    tranthor.DIALECT,
    segmentstream.DIALECT,
    nucleus.DIALECT,  # last: its catch-all `/{appId}` websocket route would shadow others
)
