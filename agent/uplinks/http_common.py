"""What HTTP uplinks share: status classification and Retry-After parsing."""

from __future__ import annotations

import email.utils
import time

import aiohttp

from .base import RETRYABLE_STATUSES


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def is_retryable(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


NETWORK_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
