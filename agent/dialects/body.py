"""Reading request bodies for every dialect: size limits, gzip, parsing off the loop.

Limits are enforced while reading, so an oversized body is refused without
being read whole, and a gzip bomb is stopped at the same limit.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from agent.dialects import offload

T = TypeVar("T")
R = TypeVar("R", bound=bytes | str)

CHUNK = 65536
# listen.body_timeout_s, set by the app builder: a body stalled past it is refused
# (Stalled).
BODY_TIMEOUT_S = web.AppKey("body_timeout_s", float)
STALLED_RETRY_AFTER_S = 1   # its app's next try comes whole, as most do at once
OUTPOST_AGENT = "outpost"   # the User-Agent of another Outpost's segment-http uplink


class BodyError(Exception):
    """A client mistake in the body; each dialect renders it in its own shape."""

    retry_after: int | None = None

    def __init__(self, status: int, message: str, details: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


class Busy(BodyError):
    """Not the client's mistake: in-flight bodies are at their budget. Each dialect
    answers its own "retry later" status (503, or 429 where that is the API's) with
    Retry-After."""

    def __init__(self, details: str, retry_after: int,
                 message: str = "agent busy, retry later") -> None:
        super().__init__(503, message, details)
        self.retry_after = retry_after


class Stalled(Busy):
    """A body not received whole within listen.body_timeout_s: no mistake in the request
    (its app stopped mid-send, a link gone quiet), which sent again gets through. So it is
    answered "retry later", as a busy agent is: a 408 is final to rudder-sdk-python,
    analytics-python 1.x and RudderStack's JavaScript SDK (any 4xx but 429), which dropped
    the batch. Routes whose clients read a 408 as a link too slow for the batch (another
    Outpost's uplinks, which halve their batches for it) answer it 408 (``timed_out``)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"incomplete after {seconds:g} s (listen.body_timeout_s)",
                         STALLED_RETRY_AFTER_S, "request body not received in time")

    def timed_out(self) -> BodyError:
        """The same refusal as a 408."""
        return BodyError(408, self.message, self.details)


class TooManyObjects(BodyError):
    """A body holding too many objects and arrays to parse (``refuse_too_many_objects``)."""

    def __init__(self, count: int, most: int) -> None:
        super().__init__(413, f"request body too large to parse: {count:,} objects and "
                         f"arrays, at most {most:,}")


class Reservation(Protocol):
    held: int   # bytes taken so far

    def take(self, n: int) -> None:
        """Count ``n`` more bytes as in flight; raises Busy when they do not fit."""

    def give(self, n: int) -> None:
        """Stop counting ``n`` of the bytes taken."""


# The running request's reservation against the in-flight body budget
# (agent/server/admission.py), set around each ingest handler (agent/server/app.py);
# read_raw charges every body byte to it.
TICKET: ContextVar[Reservation | None] = ContextVar("outpost_ticket", default=None)


# Bytes an event counts as at least against the in-flight budget once its body is parsed:
# until its commit an event holds 0.5-1 KB (its Event, its stored body, its row) however
# few bytes it came as. Counted by their bytes alone (or at 32 bytes a Nucleus event),
# 100 apps posting batches of 2,000 Segment messages of 33 bytes took the agent 186 MB past
# idle within the 6 MiB default budget, and as many posting 4,000 Nucleus events of a dozen
# bytes 138 MB; counted so, about 50 MB each.
EVENT_HELD = 128


def count_events(ticket: Reservation | None, n: int) -> None:
    """Charge ``ticket`` for ``n`` parsed events at EVENT_HELD bytes apiece, where that is
    more than the body bytes it holds (real events are larger). Raises Busy."""
    if ticket is not None and n * EVENT_HELD > ticket.held:
        ticket.take(n * EVENT_HELD - ticket.held)


def whole_body(raw: bytes, limit: int) -> bytes:
    """A body that came whole with its head, as ``read_raw`` takes one: held to ``limit``
    and charged to the request's ticket (the server's express lane, agent/server/express.py)."""
    if len(raw) > limit:
        raise BodyError(413, "request body too large", f"{len(raw)} bytes, limit {limit}")
    ticket = TICKET.get()
    if ticket is not None and raw:
        ticket.take(len(raw))
    return raw


async def read_raw(request: web.Request, limit: int) -> bytes:
    """The body, decoded per Content-Encoding, refused past ``limit`` bytes.

    Every byte is reserved against the in-flight budget before it is read (the
    declared Content-Length at once), so a busy agent refuses without reading.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise BodyError(413, "request body too large", f"{length} bytes, limit {limit}")
    _refuse_transfer_coding(request)
    # Every line of it: two lines are one list (RFC 9110 5.3), and the first alone would
    # leave a coding named in the second unapplied.
    encoding = ", ".join(request.headers.getall("Content-Encoding", ("identity",))
                         ).strip().lower()
    if encoding not in ("identity", "", "gzip", "x-gzip", "deflate"):
        raise BodyError(415, f"unsupported Content-Encoding {encoding!r}",
                        "accepted: gzip (or x-gzip), deflate (zlib-wrapped), or none (identity)")
    ticket = TICKET.get()
    if ticket is not None and length:
        ticket.take(length)
    content = request.content
    raw: bytes | bytearray
    try:
        if not content.is_eof():
            await _continue(request)
        if content.is_eof():  # the whole body came with the head: the usual case
            # Taken as it is: no read loop, no copy (a few µs of every small request).
            whole = content.read_nowait()
            if len(whole) > limit:
                raise BodyError(413, "request body too large", f"over {limit} bytes")
            if ticket is not None and length is None:
                ticket.take(len(whole))
            raw = whole
        else:
            seconds = request.app[BODY_TIMEOUT_S]
            try:
                async with asyncio.timeout(seconds):
                    raw = await _read(request, limit, ticket, length)
            except TimeoutError:
                stalled = Stalled(seconds)
                # Another Outpost's segment-http uplink says who it is; it halves its
                # batches on a 408 (the link too slow for them), and retries a 503 as sent.
                if request.headers.get("User-Agent") == OUTPOST_AGENT:
                    raise stalled.timed_out() from None
                raise stalled from None
    except ConnectionError:
        # The client hung up mid-body (aiohttp hands the read a ConnectionResetError), or
        # shut its side down (server/connections.py, before this read began or during it):
        # refused, like any incomplete body, though only the latter can read the reply.
        raise BodyError(400, "request body incomplete",
                        "the connection closed before the body ended") from None
    except HttpProcessingError as exc:
        # Its framing broken (a chunk size that is no number: server/connections.py hands
        # the parser's error to the body). Its first line, without the bytes it quotes.
        raise BodyError(400, "malformed request body",
                        exc.message.split("\n", 1)[0].rstrip(": ")) from None
    if encoding in ("gzip", "x-gzip", "deflate"):
        if ticket is None:
            return _inflate(bytes(raw), encoding, limit)
        # Each piece charged before it is inflated (a 4 MiB limit charged whole would turn
        # away a second small gzip post); what the last piece left unused is given back.
        charged = 0

        def charge(n: int) -> None:
            nonlocal charged
            ticket.take(n)
            charged += n
        out = _inflate(bytes(raw), encoding, limit, charge)
        ticket.give(charged - len(out))
        return out
    return raw if isinstance(raw, bytes) else bytes(raw)


def expects_continue(request: web.Request) -> bool:
    """Whether ``request``'s client waits for `100 Continue` (which ``read_raw`` sends once
    the route wants the body) before it sends its body."""
    return request.headers.get("Expect", "").strip(" \t").lower() == "100-continue"


async def _continue(request: web.Request) -> None:
    """`100 Continue` to a client waiting for it before it sends its body (RFC 9110
    §10.1.1: an HTTP/1.0 client cannot read one)."""
    if request.version == HttpVersion11 and expects_continue(request):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0   # the reply's own bytes are yet to come


def _refuse_transfer_coding(request: web.Request) -> None:
    """A transfer coding but chunked is refused, 501 (RFC 9112 6.1): aiohttp's parser frames
    `gzip, chunked` as chunked and drops the gzip, so the route would parse the coded
    bytes as the body. HTTP libraries never send one; a body is compressed by
    Content-Encoding."""
    codings = request.headers.getall("Transfer-Encoding", ())
    if codings and [c.strip().lower() for c in ",".join(codings).split(",")] != ["chunked"]:
        raise BodyError(501, f"unsupported Transfer-Encoding {', '.join(codings)!r}",
                        "accepted: chunked alone; compress a body with Content-Encoding: gzip")


async def _read(request: web.Request, limit: int, ticket: Reservation | None,
                length: int | None) -> bytearray:
    raw = bytearray()
    while chunk := await request.content.read(CHUNK):
        raw += chunk
        if len(raw) > limit:
            raise BodyError(413, "request body too large", f"over {limit} bytes")
        if ticket is not None and length is None:  # chunked: reserve as it comes
            ticket.take(len(chunk))
    return raw


GZIP_MEMBERS = 64   # `cat a.gz b.gz` makes a few; 200,000 empty ones fit in 4 MiB
INFLATE_STEP = 256 * 1024   # bytes inflated, and charged, at a time


def _inflate(data: bytes, encoding: str, limit: int,
             charge: Callable[[int], None] | None = None) -> bytes:
    """``data`` decompressed, at most ``limit`` bytes, ``charge``d ahead of each piece of
    at most INFLATE_STEP bytes (only what its output so far has not used of the charge
    before). A gzip body may be several members one after the other
    (`cat a.gz b.gz`, RFC 1952), up to GZIP_MEMBERS of them (each read copies what is
    left after it); zero bytes may pad the last, as gzip(1) allows; anything else after
    it is refused, never ignored."""
    wbits = 47 if encoding != "deflate" else 15  # 47: gzip or zlib header, auto-detected
    parts: list[bytes] = []
    size, charged, rest = 0, 0, data
    for _ in range(GZIP_MEMBERS):
        inflater = zlib.decompressobj(wbits)
        pending = rest
        while True:
            step = min(INFLATE_STEP, limit + 1 - size)
            if charge is not None and size + step > charged:
                charge(size + step - charged)
                charged = size + step
            try:
                part = inflater.decompress(pending, step)
            except zlib.error as exc:
                raise BodyError(400, f"invalid {encoding} body", str(exc)) from exc
            parts.append(part)
            size += len(part)
            if size > limit:
                raise BodyError(413, "request body too large",
                                f"over {limit} bytes once decompressed")
            pending = inflater.unconsumed_tail
            # A piece that filled its step may have more output held back: ask again.
            if inflater.eof or not (pending or len(part) == step):
                break
        if not inflater.eof:
            raise BodyError(400, f"truncated {encoding} body")
        rest = inflater.unused_data
        if not rest.strip(b"\0"):
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if not rest.startswith(b"\x1f\x8b"):
            raise BodyError(400, f"invalid {encoding} body",
                            f"{len(rest)} bytes after the end of the compressed data")
    raise BodyError(400, f"invalid {encoding} body", f"more than {GZIP_MEMBERS} gzip members")


# The most objects and arrays one body may hold: one per 16 bytes of the 4 MiB the largest
# bodies may be. Parsed, each is a Python object of 70-200 bytes, most of a parse's
# memory: a real 4 MiB message (38,000 Nucleus events, one object per ~110 bytes) parses to
# ~20 MB, one of 4 MiB of `{}` (1.4 million) to ~100 MB, 150 MB of RSS, before any limit on
# events could apply. Real events are 100 bytes or more, with a few nested objects at most.
MAX_CONTAINERS = 4 * 1024 * 1024 // 16


def refuse_too_many_objects(raw: bytes | str) -> None:
    """Raise TooManyObjects (413) for ``raw`` holding over MAX_CONTAINERS `{` and `[` (objects
    and arrays, or those characters in strings), unparsed: ~1 ms a MiB, nothing for a body
    too small to hold that many."""
    if len(raw) <= MAX_CONTAINERS:
        return
    if isinstance(raw, bytes):
        n = raw.count(b"{") + raw.count(b"[")
    else:
        n = raw.count("{") + raw.count("[")
    if n > MAX_CONTAINERS:
        raise TooManyObjects(n, MAX_CONTAINERS)


def as_is(raw: R) -> R:
    """``parse_body``'s reader for a builder that reads the raw body itself (a body stored
    as sent: segment_as_sent.py, nucleus_as_sent.py)."""
    return raw


async def parse_body(raw: R, read: Callable[[R], Any], build: Callable[[Any, int], T]) -> T:
    """``build(read(raw), len(raw))``: a body parsed and validated, off the event loop
    when large (see offload.py), and refused unparsed when it holds too many objects and
    arrays (``refuse_too_many_objects``).

    Pass read_raw's result straight in (``store(await parse_body(await read_raw(...),
    ...))``): the body and its parsed form are then gone before the commit is awaited.
    With 32 batches waiting on a group commit they were most of the agent's peak memory.
    """
    def work() -> T:
        refuse_too_many_objects(raw)
        return build(read(raw), len(raw))
    return await offload.parse(len(raw), work)
