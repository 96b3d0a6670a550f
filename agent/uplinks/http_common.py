"""What HTTP uplinks share: status classification and Retry-After parsing."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

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


@dataclass
class HttpReply:
    status: int
    body: bytes
    retry_after: float | None


async def post(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
               timeout_s: float) -> HttpReply | str:
    """POST ``body``: the reply, or what went wrong on the network (never raises for it)."""
    try:
        async with session.post(url, data=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return HttpReply(resp.status, await resp.read(),
                             retry_after(resp.headers.get("Retry-After")))
    except NETWORK_ERRORS as exc:
        return f"request failed: {str(exc) or type(exc).__name__}"
