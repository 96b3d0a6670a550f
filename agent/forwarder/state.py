"""What status and metrics show for one upstream, shared by its key loops."""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent.logs import redact


@dataclass
class UpstreamState:
    """What status and metrics show for one upstream (shared by its key loops)."""

    name: str
    protocol: str
    state: str = "idle"          # idle | sending | backoff | restarting (after a crash)
    # Status shows "unreachable" instead while unreachable_since is set.
    last_ack: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    retries: int = 0
    sent: int = 0                # events in batches sent or tried, a resend counting again
    acked: int = 0
    dead_lettered: int = 0
    crashes: int = 0             # unexpected exceptions caught by the supervisor
    unreadable_replies: int = 0  # upstream messages ignored as unreadable (websocket: not JSON)
    # Wall time a probe first failed to connect; while set, probed every 2 s (probe.py).
    unreachable_since: float | None = None
    probes: int = 0              # TCP probes finished
    # The most bytes per batch it takes, learned from its refusals (a websocket closed
    # with 1009 for a frame: half that frame): loops send it no larger ones.
    frame_limit_bytes: int | None = None

    def unreadable_reply(self) -> None:
        self.unreadable_replies += 1

    def error(self, text: str) -> None:
        # Upstream replies and exceptions can echo a key: status, the page and
        # /metrics show this, so it is redacted (and bounded) here, once.
        self.last_error = redact(text)[:300]
        self.last_error_at = time.time()
