"""Reply helpers the dialects share: JSON replies, the status of a family's Invalid, one
error funnel, and counting refusals."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any, TypeVar

import orjson
from aiohttp import web

from agent.dialects.body import BodyError, Busy
from agent.families.depth import shortened
from agent.families.errors import Invalid
from agent.logs import hiding, log_limited
from agent.spool.types import SpoolFull

# Counts an ingest refusal by status; set around each ingest handler (agent/server/app.py),
# which counts every 4xx/5xx reply itself. Dialects call ``refused`` only for refusals
# their reply does not show: the pixel's 200 GIF, a websocket closed or left unacked.
REFUSALS: ContextVar[Callable[[int], None] | None] = ContextVar("outpost_refusals", default=None)


def refused(status: int) -> None:
    count = REFUSALS.get()
    if count is not None:
        count(status)


def masked(key: str) -> str:
    """A key for the log: keys are credentials, and one never stored is not in the log
    redaction registry yet. (The log shows what a terminal obeys escaped: agent/logs.py.)"""
    return key[:3] + "***"


# How many keys a batch's refusal line names: the rest are counted.
NAMED_KEYS = 3


def refused_items(log: logging.Logger, key: str, refusals: Sequence[tuple[int, str]],
                  total: int, *, others: Sequence[str] = ()) -> None:
    """Count and log the messages of a batch refused while the rest of it was stored:
    an SDK reads the 2xx as success, so nothing else shows them. Each (status, why) is
    counted under its own status; logged at most once a minute per logger and ``key``.
    ``key``: the first refused message's; ``others``: the other keys refused messages
    were sent under (a Segment batch whose messages name their own)."""
    for status, _ in refusals:
        refused(status)
    more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
    named = (key, *others[:NAMED_KEYS - 1])
    whose = f"key {masked(key)}" if not others else "keys " + ", ".join(map(masked, named))
    if len(others) + 1 > len(named):
        whose += f" and {len(others) + 1 - len(named)} more"
    log_limited(log, logging.WARNING, f"refused-items:{key}",
                "%d of %d messages of a batch for %s refused, the rest stored: %s%s",
                len(refusals), total, whose,
                # Redacted before the cut: a key the cut falls in is found whole. The
                # keys named too (the first refusal's among them): a new one is not
                # registered yet. Not every refused key: a batch may name thousands.
                shortened(hiding(named, refusals[0][1], 301), 300),
                more)


def stored_in_part(log: logging.Logger, key: str, refused: Mapping[int, Invalid],
                   stored: int) -> tuple[str, list[tuple[int, str]]]:
    """A batch whose ``stored`` messages were taken and those in ``refused`` were not:
    the refused ones counted and logged (``refused_items``); returns the 207's summary and
    each refused message's (status, error text), in order, for the API's own shape."""
    items = [(status_of(exc), describe(exc)) for exc in refused.values()]
    total = stored + len(items)
    refused_items(log, key, items, total)
    return f"{len(items)} of {total} messages refused", items


def legible(status: int, message: str) -> dict[str, str]:
    """`code` and `message`: what analytics-python 1.x and rudder-sdk-python read from any
    reply but a 200 (a KeyError without them: taken for a network error, the refused batch
    was resent ten times with backoff). The code is the status in words."""
    return {"code": HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_"),
            "message": message}


def plain_error(status: int, message: str) -> dict[str, str]:
    """The body of a refusal in no API's own shape (the guard's, a path no route serves):
    `{"error"}`, with ``legible``'s fields beside it, as the request may be a Segment SDK's."""
    return {"error": message, **legible(status, message)}


def json_reply(body: Any, status: int, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


class Fixed:
    """A reply that is the same at every request, built once: the express lane
    (agent/server/express.py) writes it with no aiohttp Response made a request (one cost
    a single call ~15k instructions, 5% of it: callgrind). Only the lane takes one:
    aiohttp changes a Response as it sends it, so its routes return one of their own."""

    __slots__ = ("response", "status")

    def __init__(self, response: web.Response) -> None:
        self.response = response
        self.status = response.status


# What a single call the spool took is answered (Segment's API), in the express lane.
STORED = Fixed(json_reply({"Success": True}, 200))


class KeyRefused(Invalid):
    """The request's key, let in at its head, was refused by the time its events were to
    be stored: a reload took it out of listen.accept_keys while the body was still read.
    Nothing is stored; it is answered as at the head (401)."""


def status_of(exc: Invalid) -> int:
    """The HTTP status of a message the family rules refused."""
    if isinstance(exc, KeyRefused):
        return 401
    return 413 if exc.too_large else 400


def describe(exc: BodyError | Invalid) -> str:
    return exc.message + (f": {exc.details}" if exc.details else "")


# A body not received whole within listen.body_timeout_s, as another Outpost is told it
# (body.Stalled): every other client is told to retry later.
TIMED_OUT = 408
ErrorReply = Callable[[int, str, int | None], web.Response]
R = TypeVar("R")


async def settle(work: Awaitable[R], error: ErrorReply, *, full_status: int = 503,
                 client_status: int | None = None) -> R | web.Response:
    """Await ``work`` (read, parse, store): its result when done, else the error reply.

    Client mistakes get their own status (or ``client_status`` for APIs with one
    status for every client error), but a body not received in time, no mistake in the
    request: a 408 to another Outpost, else (body.Stalled) answered as a busy agent is; a
    full spool or a busy agent gets ``full_status`` and Retry-After, never a 500.
    """
    try:
        return await work
    except Busy as exc:
        return error(full_status, describe(exc), exc.retry_after)
    except BodyError as exc:
        status = exc.status if exc.status == TIMED_OUT else client_status or exc.status
        return error(status, describe(exc), None)
    except KeyRefused as exc:   # no client mistake in the request: the 401 of its head
        return error(status_of(exc), describe(exc), None)
    except Invalid as exc:
        return error(client_status or status_of(exc), describe(exc), None)
    except SpoolFull as exc:
        return error(full_status, f"spool full, retry later: {exc}", exc.retry_after)
