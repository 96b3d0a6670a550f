"""How long a forwarder waits after a failure: jittered, capped, or longer if the upstream says so."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """The waits after failures. One policy for the agent; tests pass a faster one."""

    base_s: float = 0.5
    cap_s: float = 60.0
    retry_after_cap_s: float = 3600.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """`base * 2**attempt`, capped, times a jitter in [0.5, 1)."""
        return float(min(self.cap_s, self.base_s * 2 ** min(attempt, 16)) * (0.5 + rng() / 2))

    def retry_after(self, seconds: float, attempt: int,
                    rng: Callable[[], float] = random.random) -> float:
        """The upstream's Retry-After, capped (a typo'd header must not park a key for a
        week), and never shorter than ``delay(attempt)``: `Retry-After: 0`, or an HTTP-date
        already past on a device whose clock runs ahead, asks for relief, not a tight loop."""
        return max(min(seconds, self.retry_after_cap_s), self.delay(attempt, rng))


BACKOFF = Backoff()
