"""The Segment API's replies (seed 003): error bodies and a batch's verdict.

Error bodies are the seed's, ``{"Error","Message","Details"}`` for single calls and
``{"Success": false, "Errors": [...]}`` for batches, each with `code` and `message`
beside them for the clients that read those (``replies.legible``). A batch stored in part is a
207 listing each refused message, `batch[i]` first in its `Details` (another Outpost's
uplink reads that), but 200 for the clients that count nothing else as success.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from aiohttp import web

from agent.dialects import replies
from agent.families.segment import merge
from agent.spool.types import SpoolFull


def error_object(status: int, message: str, details: str = "") -> dict[str, str]:
    return {"Error": HTTPStatus(status).phrase, "Message": message, "Details": details}


def _text(error: dict[str, str]) -> str:
    return f"{error['Message']}: {error['Details']}" if error["Details"] else error["Message"]


def single_error(status: int, message: str, details: str = "",
                 retry_after: int | None = None) -> web.Response:
    error = error_object(status, message, details)
    return replies.json_reply({**error, **replies.legible(status, _text(error))}, status, retry_after)


def batch_error(status: int, errors: list[dict[str, str]],
                retry_after: int | None = None) -> web.Response:
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return replies.json_reply({"Success": False, "Errors": errors,
                               **replies.legible(status, _text(errors[0]) + more)},
                              status, retry_after)


def full_batch_status(exc: SpoolFull) -> int:
    """The status of a batch the spool refused. For want of room, 429: analytics-node and
    analytics-next's batching (`/v1/b`) honour Retry-After on a 429 alone, and wait it out
    without counting a try (analytics-node up to maxRetries + 20 of them), where a 503 is a
    counted try on their own backoff, from under a second: their 10 were spent within
    minutes, and the app's events lost before the queue drained. Otherwise (the spool
    cannot store at all), 503: its short Retry-After would end a 429's tries sooner than
    their backoff does. The Python, PHP and RudderStack SDKs retry both alike. (Single
    calls stay 503: analytics-next's default delivery counts a 429's tries too, and its
    backoff, doubling without a cap, outlasts ten Retry-Afters.)"""
    return 429 if exc.no_room else 503


def verdict(errors: list[dict[str, str]], statuses: list[int], stored: int,
            partial: int = 207) -> web.Response:
    """200, ``partial`` (``partial_status``) for part of a batch, or the one status every
    message failed with."""
    if not errors:
        return replies.json_reply({"Success": True}, 200)
    if stored:
        reply = batch_error(207, errors)
        reply.set_status(partial)
        return reply
    common = set(statuses)
    return batch_error(common.pop() if len(common) == 1 else 400, errors)


# Clients that count only an exact 200 as success, named in each message's
# `context.library`: analytics-python 1.x and rudder-sdk-python retried a 207 as a
# failure, up to 10 times over ~17 minutes, their one consumer thread blocked;
# segmentio/analytics-php (its LibCurl consumer, the default, and its Socket consumer)
# and RudderStack's fork of it post the batch again at once, with no pause and no end,
# after any status that is not 200, 429, 5xx or another 4xx. Their batch stored in part
# is answered 200, with the 207's body; segment-analytics-python 2.x, also
# "analytics-python", takes both.
_ONLY_200 = frozenset({"analytics-python", "rudder-analytics-python", "analytics-php",
                       "rudder-analytics-php"})


def partial_status(first: Any, batch_context: dict[str, Any] | None) -> int:
    """The status of a batch stored in part, by the client its ``first`` message names in
    its context as completed, ``batch_context`` merged in: whatever became of that message
    (stored, or refused before or after its completion), the client is the same."""
    context = first.get("context") if isinstance(first, dict) else None
    if batch_context:   # as ``complete`` merges it (idempotent on a completed message)
        context = merge(batch_context, context) if isinstance(context, dict) else batch_context
    library = context.get("library") if isinstance(context, dict) else None
    name = library.get("name") if isinstance(library, dict) else None
    return 200 if type(name) is str and name in _ONLY_200 else 207
