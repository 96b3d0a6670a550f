"""How long a forwarder waits after a failure: jittered, capped, or the upstream's own word."""

from __future__ import annotations

import random
from collections.abc import Callable

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 3600.0


def backoff_delay(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """`base * 2**attempt`, capped, times a jitter in [0.5, 1)."""
    return float(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 16)) * (0.5 + rng() / 2))


def retry_after_delay(seconds: float) -> float:
    """The upstream's Retry-After, capped: a typo'd header must not park a key for a week."""
    return min(seconds, RETRY_AFTER_CAP_S)
