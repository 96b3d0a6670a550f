"""Deadlines and a cap for the local server's connections, so idle or slow ones cannot
use up the agent's file descriptors and starve real apps.

aiohttp has no connection cap, and its keep-alive timer is not enough on every version
we support: up to 3.14.0 at least, a connection that never sends a request is never
timed out, and no version cuts a head that trickles in a byte at a time. So each accepted
connection goes through a thin protocol wrapper (``_Conn``) that sees its bytes, and
the server's request handler is wrapped to see when a request is being handled. A
connection is in one of these states:

- IDLE, waiting for a request's first byte (after connecting, or after its last
  reply): closed ``idle_timeout_s`` after it became idle;
- HEAD, a request's first byte arrived (or an empty line before one) but not yet its
  whole head, or not one aiohttp takes (until its 400 is sent): closed
  ``header_timeout_s`` after that byte, however slowly more bytes trickle in, and
  answered 431 once the head is past HEAD_MAX bytes. Neither IDLE nor HEAD is closed
  while aiohttp holds a whole request whose route is about to begin (one sent ahead of
  an answer, or behind the rest of a body refused early: ``_routes_on``);
- BUSY, a handler runs, or is about to: its head is whole, and aiohttp, which waited for
  it, takes it next. No deadline here. Bodies are deadlined where they are read
  (dialects/body.py), so that the app is told (body.Stalled);
- WEBSOCKET, an upgraded connection: no deadline (a Nucleus module may stay quiet for
  long); the time of its last frame is kept;
- LINGER, answered for the last time (a 431, a 400 for a broken body) and half-closed:
  what the client still sends is read and dropped until it closes, or for ``linger_s``
  (``linger``).

aiohttp also takes header fields outside a head it waits for: a chunked body's trailer
section, and the head of a request sent ahead of the answer to the one before it. What
comes after a head is handed over in pieces of at most SLICE bytes, none past the end of a
head or of a Content-Length body (``_piece_end``), and the bytes that add nothing to a body
nor complete a request are counted: past HEAD_MAX the connection is closed, with no reply
(one could be read as the answer to an earlier request). A body
whose framing the parser refuses (a chunk size that is no number) is failed with its error,
for its route to answer 400, and the connection closed after that reply
(``_failed_in_body``).

aiohttp queues at most 32 requests sent ahead of their answers, then stops reading; the
rest of the read that brought them waits here, unparsed, until half are answered
(``_hold_back``).

Past ``max_connections`` open connections, the one IDLE or HEAD the longest is closed
to make room; failing that, the websocket quiet the longest (its module reconnects and
resends what was not acknowledged); failing that (all BUSY), the newcomer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from agent.dialects.base import CLIENT_EOF
from agent.dialects.replies import plain_error
from agent.logs import log_limited
from agent.metrics import Metrics
from agent.server.express import MORE, ExpressLane, HeadScan
from agent.settings import ListenConfig

log = logging.getLogger("outpost")
IDLE, HEAD, BUSY, WEBSOCKET, LINGER = 0, 1, 2, 3, 4
# After an early reply (aiohttp's, after a 413 or a stalled body's 503; ours, after a 431)
# the rest of what the client sends is read and dropped, so that it sees the reply rather
# than a reset. Over loopback the rest takes milliseconds; aiohttp's 10 s default would let
# a stalled client hold its connection that much longer.
LINGER_S = 2.0
# Descriptors the agent needs besides client connections: the spool's files, logs, the
# event loop's own, and one socket per upstream connection (a forwarder per key).
FD_RESERVE = 256
# The event loop (asyncio or uvloop) accepts up to a listen backlog's worth of
# connections in one go before any is handed to us to close: that many must fit on top
# of the cap, or accept() fails with EMFILE (and uvloop then resets connections).
MAX_BACKLOG = 1024
# Bytes an express connection may send ahead of its replies before reading pauses.
BUF_MAX = 64 * 1024
# A request's line and fields together: the pixel's line (up to 64 KiB, MAX_REQUEST_LINE
# in service.py) and 16 KiB of fields (a browser's cookies are at most 8 KiB, aiohttp's
# limit on a field). aiohttp's own limits (128 fields of 8 KiB) let each connection hold
# a head of 1 MB, about 2 MB of memory parsed: 2 GB at listen.max_connections.
HEAD_MAX = 80 * 1024
_BLANK_LINE = re.compile(rb"\n\r?\n")   # a head's end (aiohttp takes a bare LF too)
# A chunked body's end, with no trailer field (the same bytes within a chunk's data only end
# a piece early).
_LAST_CHUNK = re.compile(rb"\r\n0\r\n\r\n")
# Bytes after a head given to aiohttp at a time: where a body ends is seen within that many.
SLICE = 16 * 1024
# Chunks of a chunked body aiohttp parses ahead of its route before reading pauses (its
# own default with its C parser: 16,384). Each chunk is an object of its own, ~100 bytes
# for a chunk of one byte, which the in-flight budget sees only once the route reads it:
# ~1 MB a connection for 10-16 KB of body (200 connections sending 1-byte chunks: +210 MB).
# Large chunks reach aiohttp's byte limit first, as before. Set on the body once its head
# is parsed: a piece ends at a chunked body's end (``_piece_end``), but past one whose
# trailer has fields, a head sent ahead in the same piece has that piece's chunks parsed
# under aiohttp's limit first.
CHUNKS_AHEAD = 64
_HEAD_MESSAGE = (f"request head over {HEAD_MAX} bytes "
                 "(its request line and header fields together)")
_HEAD_BODY = orjson.dumps(plain_error(431, _HEAD_MESSAGE))
HEAD_REFUSAL = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"Content-Type: application/json; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(_HEAD_BODY), _HEAD_BODY))

# The server's handler of every request (aiohttp's app, wrapped by ours).
ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def fit_fd_limit(max_connections: int) -> tuple[int, int]:
    """(connection cap, listen backlog) that fit the process's fd limit.

    The soft limit is first raised as far as needed, when the hard limit allows: the
    usual soft default (1024, 256 on macOS) is kept low only for select() users.
    """
    if sys.platform == "win32":
        return max_connections, MAX_BACKLOG
    import resource

    need = max_connections + MAX_BACKLOG + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit to %d: %s", target, exc)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return max_connections, MAX_BACKLOG
    budget = max(soft - FD_RESERVE, 8)
    backlog = min(MAX_BACKLOG, budget // 4)
    cap = max(1, min(max_connections, budget - backlog))
    if cap < max_connections:
        log.warning("only %d open files allowed (RLIMIT_NOFILE; LimitNOFILE in a systemd "
                    "unit): at most %d connections at once, not listen.max_connections = %d",
                    soft, cap, max_connections)
    return cap, backlog


def _awaits_request(inner: Any) -> bool:
    """Whether aiohttp's protocol waits for a request: what comes is a head (or the rest of
    one), not a body, nor the rest of one refused early that it reads and drops (aiohttp
    3.14's ``start`` loop: no message queued, waiting on ``_waiter``). A request sent ahead
    of an answer is counted as it is handed over (``_Conn._feed``)."""
    waiter = getattr(inner, "_waiter", None)
    return waiter is not None and not waiter.done() and not inner._messages


def _counted(inner: Any) -> bool:
    """Whether bytes aiohttp's protocol is given may become header fields: not once the
    connection is upgraded (a websocket's frames), nor once it is closing (it drops them)."""
    return not (inner._upgraded or inner._close or inner._force_close)


def _to_route(inner: Any) -> bool:
    """Whether aiohttp's queue holds a request for its route: it may hold none after a
    blank line (empty lines before a request line are skipped, no head), or its own 400
    for a head it refused. That reply is deadlined as a head until it is sent and the
    connection lingers (``_refused``): it repeats the refused line (60 KB of bytes shown
    \\x80 each make 240 KB), and its write waits for good on a client that reads nothing."""
    messages = inner._messages
    return bool(messages) and not isinstance(getattr(messages[0][0], "exc", None),
                                             HttpProcessingError)


def _routes_on(conn: _Conn) -> bool:
    """Whether a request aiohttp parsed on ``conn`` is yet to be routed (in its queue, or
    taken off it, its route about to begin), and nothing holds that up for long: aiohttp
    neither closes the connection nor waits for its client to read (a reply's write, once
    the transport's buffer is full)."""
    inner: Any = conn.inner
    transport = conn.transport
    return inner._request_count != conn.answered and conn.writable \
        and not inner._force_close and transport is not None and not transport.is_closing()


def _queue_full(inner: Any) -> bool:
    """Whether aiohttp's queue of parsed requests is full: it has paused reading."""
    return len(inner._messages) >= getattr(inner, "_max_msg_queue_size", sys.maxsize)


def _few_chunks(body: Any) -> None:
    """Reading pauses once CHUNKS_AHEAD chunks of ``body`` (a chunked body's StreamReader:
    aiohttp 3.14's chunk watermarks) wait for its route, and resumes at half of them."""
    if getattr(body, "_high_water_chunks", 0) > CHUNKS_AHEAD:
        body._high_water_chunks, body._low_water_chunks = CHUNKS_AHEAD, CHUNKS_AHEAD // 2


def _content_length(message: Any) -> int | None:
    """A parsed request head's Content-Length; None for a chunked body (or none)."""
    length = None if getattr(message, "chunked", True) \
        else message.headers.get("Content-Length")
    return None if length is None else int(length)


def _cut_short(body: Any) -> None:
    """Refuse ``body`` (a request's, or None) if the client's EOF left it incomplete."""
    if body is not None and not body.is_eof():
        body.set_exception(ConnectionResetError("the client closed its side mid-body"))
        body.feed_eof()   # ended: aiohttp reads nothing more of it (as _failed_in_body)


def _held(inner: Any) -> bool:
    """Whether aiohttp's protocol holds bytes sent behind an upgrade request it has not
    parsed: once the upgrade is declined (the route answered plainly), it would parse them
    as requests itself (aiohttp 3.14's ``finish_response``), after the route's wrapper
    returns, unseen by the connection (``_Conn.feed_held``). Not once the connection is
    lost: its parser is gone."""
    return bool(inner._upgraded and inner._payload_parser is None and inner._message_tail
                and not inner._messages and inner._parser is not None)


class _Conn(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection; tracks its state and deadline.

    A connection starts in the express lane (``lane``, server/express.py), which answers
    the plain requests it can, one at a time (pipelined ones wait in ``buf``), and hands
    the connection to aiohttp (``inner``) for good at the first request it cannot.
    """

    __slots__ = ("active", "ahead", "answered", "behind", "broken", "buf", "deadline", "edge",
                 "eof", "finished", "head", "inner", "lane", "length", "limits", "parsed",
                 "paused", "payload", "pos", "scan", "serving", "spare", "state", "timer",
                 "transport", "writable")

    def __init__(self, limits: ConnectionLimits, inner: asyncio.Protocol,
                 lane: ExpressLane | None) -> None:
        self.limits = limits
        self.inner = inner
        self.lane = lane
        self.buf = bytearray()  # the express lane's bytes; those before ``pos`` are answered
        self.pos = 0
        self.scan = HeadScan()  # how far the lane read the head at ``pos``, not yet whole
        self.paused = False     # reading paused: more than BUF_MAX bytes wait in buf
        self.serving = False    # an express reply is pending
        # The peer stopped sending while a reply was pending (the lane's, or aiohttp's):
        # the requests it sent before are answered, then the connection closes.
        self.eof = False
        self.writable = True    # the transport's buffer is below its high-water mark
        self.transport: asyncio.Transport | None = None
        self.state = IDLE
        self.deadline = 0.0
        self.active = 0.0  # a websocket's last frame, by the loop's clock
        self.timer: asyncio.TimerHandle | None = None
        # Bytes of the head aiohttp is being given, before its blank line (-1: none is), and
        # the last two of them, where that line may begin.
        self.head = -1
        self.edge = b""
        # The body of the last request aiohttp parsed (None: none yet), and the bytes it was
        # given since it last took a body byte or a whole head: header fields it holds.
        self.payload: Any = None
        self.length: int | None = None   # its Content-Length (None: chunked, or none yet)
        # aiohttp's count of requests parsed when ``payload`` was taken: behind it, aiohttp
        # parsed one unseen (``catch_up``).
        self.parsed = 0
        self.spare = 0
        # The body of the last request whose route has returned: nothing reads it but
        # aiohttp, which reads and drops what the route left of it (lingering).
        self.finished: Any = None
        # A body the parser failed in (``_failed_in_body``): the connection closes once its
        # route has answered, and nothing after the fault is read.
        self.broken: Any = None
        # Requests aiohttp parsed whose route has returned (its own 400s aside: it closes).
        self.answered = 0
        # Bytes read while aiohttp's queue of requests was full, not handed to it yet
        # (``_hold_back``).
        self.behind = b""
        # The rest of a read, kept while aiohttp's reading is paused by a body's watermarks
        # (``_feed``), handed over as a route's read resumes it (``resume_reading``).
        self.ahead = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast: uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.inner.connection_made(transport)
        self.limits.opened(self)

    def data_received(self, data: bytes) -> None:
        if self.lane is not None:
            self.buf += data
            if not self.serving and self.writable:
                self._next()
            self._bound()
            return
        self._to_inner(data)

    def _to_inner(self, data: bytes) -> None:
        inner: Any = self.inner
        if self.state == LINGER:
            return   # answered for the last time: read and dropped
        if self.ahead:   # what a read kept comes first (``_feed``)
            data, self.ahead = self.ahead + data, b""
        if inner._close or inner._force_close:
            if self._reading_body():
                self._rest_of_body(data)
            return   # answered for the last time, or about to be: read and dropped
        if self.state == IDLE:
            self.limits.head_started(self)
        elif self.state == WEBSOCKET:
            self.active = self.limits.now()
        if self.head < 0 and _awaits_request(self.inner):
            # What came of this head while the request before it was answered counts too.
            self.head, self.edge = self.spare, b""
        end = 0
        if self.head >= 0:
            end = self._head_end(data)
            if end < 0:
                if self.head > HEAD_MAX:
                    self.limits.head_too_large(self)
                else:
                    self.inner.data_received(data)
                return
        self._feed(data, end)
        if end and self.state == HEAD and _to_route(inner):
            # Whole, and aiohttp, which waited, takes it next: the client is done with its
            # head, and routing it is the agent's part, however long a loaded loop takes
            # (uvloop runs due timers before the callbacks made ready in the turn before,
            # such as that route's start).
            self.state = BUSY

    def _reading_body(self) -> bool:
        """Whether a route that has not returned reads a body not yet whole."""
        body = self.payload
        return self.state == BUSY and body is not None and not body.is_eof() \
            and body is not self.finished and body is not self.broken

    def _rest_of_body(self, data: bytes) -> None:
        """A stop began (aiohttp's pre_shutdown closes every connection, and aiohttp then
        parses nothing more) while a route reads a body still arriving: the rest of that
        body is parsed all the same, so that the route answers within the stop's wait for
        the requests being answered, rather than wait it out for a body that came, and
        close with no answer. The connection closes after its reply: with a
        Content-Length nothing past the body is parsed; a chunked body's data is parsed
        whole, and a request after it is never served (aiohttp's loop ends at the close)."""
        inner: Any = self.inner
        if self.length is not None:
            data = data[:max(0, self.length - self._taken())]
        flags = inner._close, inner._force_close
        inner._close = inner._force_close = False
        try:
            self._feed(data, 0)
        finally:
            inner._close, inner._force_close = flags

    def _head_end(self, data: bytes) -> int:
        """Where in ``data`` the head being read ends, past its blank line; -1 if it does
        not, ``data`` then counted in it."""
        if self.edge and (found := _BLANK_LINE.search(self.edge + data[:2])):
            self.head = -1
            return found.end() - len(self.edge)
        if found := _BLANK_LINE.search(data, 0, HEAD_MAX - self.head):
            self.head = -1
            return found.end()
        self.head += len(data)
        self.edge = data[-2:]
        return -1

    def _feed(self, data: bytes, end: int) -> None:
        """``data``, whose first ``end`` bytes end a head, to aiohttp: that head, then pieces
        that end where ``_piece_end`` says, counting what each adds to no body and no request."""
        if self.broken is not None:
            return
        inner: Any = self.inner
        at = 0
        while at < len(data):
            if not _counted(inner):   # a websocket's frames: no piece to find the end of
                inner.data_received(data[at:])
                return
            self.catch_up()
            stop = end if end and not at else self._piece_end(data, at)
            piece = data[at:stop] if at or stop < len(data) else data
            seen, taken = inner._request_count, self._taken()
            reading = self.payload if self.payload is not None and not self.payload.is_eof() \
                else None
            inner.data_received(piece)
            if reading is not None and self._failed_in_body(reading):
                return
            if inner._messages:
                message, self.payload = inner._messages[-1]
                self.parsed = inner._request_count
                if isinstance(getattr(message, "exc", None), HttpProcessingError) \
                        and self._refused(inner):
                    return   # nothing after the fault is parsed
                self.length = _content_length(message)
                self._follow(self.payload)   # before its first chunk: a head is a piece
            if inner._request_count != seen or self._taken() != taken:
                self.spare = 0
            elif self.parsed == inner._request_count:   # else whose bytes they are is unknown
                self.spare += len(piece)
                if self.spare > HEAD_MAX:
                    self.limits.fields_too_large(self)
                    return
            at = stop
            if at < len(data) and _counted(inner) and _queue_full(inner):
                self._hold_back(data[at:])
                return
            if at < len(data) and inner._reading_paused and _counted(inner):
                # Handed over, the rest of the read would wait in aiohttp's parser, which
                # parses it itself as the body's route reads on: the head of a request sent
                # ahead in it unseen, and its chunks under aiohttp's own limit of 16,384.
                self.ahead = data[at:]
                return

    def catch_up(self, request: web.BaseRequest | None = None) -> None:
        """Take the last request aiohttp parsed as the one whose body comes, where aiohttp
        parsed it unseen: a chunked body paused (``_few_chunks``) leaves the rest of the
        piece in aiohttp's parser, and what comes after that body in it (the head of a
        request sent ahead) is parsed as the body's route reads on. The last of aiohttp's
        queue, or else ``request``, the one whose route begins (``_tracked``). Left behind,
        that request's body was counted as header fields (past HEAD_MAX the connection was
        closed unanswered), and not cut short at the client's EOF (``_inner_eof``)."""
        inner: Any = self.inner
        if self.parsed == inner._request_count:
            return
        if inner._messages:
            message, payload = inner._messages[-1]
            length = _content_length(message)
        elif request is not None:
            payload, length = request.content, request.content_length
        else:
            return   # off the queue, its route not begun yet: caught up as it does
        self.payload, self.length = payload, length
        self.parsed, self.spare = inner._request_count, 0
        self._follow(payload)   # else read up to aiohttp's own limit ahead of its route

    def _follow(self, body: Any) -> None:
        """``body``, the last request's, read at most CHUNKS_AHEAD chunks ahead of its route
        if chunked (``_few_chunks``), and its route's reads resume aiohttp's reading through
        this connection (``resume_reading``), which catches up with what that parses."""
        if self.length is None:
            _few_chunks(body)
        if hasattr(body, "_high_water_chunks"):   # a StreamReader, not aiohttp's empty one
            body._protocol = self

    # aiohttp's protocol, as the bodies this connection follows see it (``_follow``).
    @property
    def connected(self) -> bool:
        inner: Any = self.inner
        return bool(inner.connected)

    def pause_reading(self) -> None:
        inner: Any = self.inner
        inner.pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        """A route read its body below aiohttp's low watermarks: aiohttp's parser parses on
        what it holds (the rest of a piece in which a chunked body paused it), and a request
        it parses there, unseen, is caught up with at once. Once taken off aiohttp's queue,
        that request could not be until its route began, and what came of its body meanwhile
        was read up to aiohttp's own 16,384 chunks ahead of that route."""
        inner: Any = self.inner
        inner.resume_reading(resume_parser)
        if resume_parser:   # else a body ended: the parser is at work, or done
            self.catch_up()
            self.go_ahead()

    def go_ahead(self) -> None:
        """What ``_feed`` kept of a read handed over, once aiohttp reads again."""
        inner: Any = self.inner
        if self.ahead and not inner._reading_paused:
            self._to_inner(b"")

    def _hold_back(self, rest: bytes) -> None:
        """aiohttp's queue of requests is full, and it paused reading: ``rest``, the rest of
        a read, waits here until the queue drains (``read_on``). Handed over piece by piece,
        it was all parsed: aiohttp's C parser, once its queue is full, still parses one
        request at each call, so every request of every read was queued, about 3 KB each
        once parsed (100 connections sending 400 KB of `GET /healthz` ahead of their answers
        took the agent 258 MB past idle, 15 MB with this). aiohttp would resume reading
        by itself as its queue drains, and a read then, before ``rest`` is handed over,
        would be added to it at every turn: ``read_on`` resumes it instead."""
        inner: Any = self.inner
        self.behind = rest
        inner._msg_queue_resume_size = -1

    def read_on(self) -> None:
        """What was held back handed to aiohttp once its queue has drained to where aiohttp
        itself resumes reading, and reading resumed, unless that filled the queue again."""
        inner: Any = self.inner
        if not self.behind or len(inner._messages) > inner._max_msg_queue_size // 2:
            return
        rest, self.behind = self.behind, b""
        inner._msg_queue_resume_size = inner._max_msg_queue_size // 2
        self._to_inner(rest)
        if not self.behind and inner._buffer_paused:
            inner._resume_reading_if_drained()

    def _piece_end(self, data: bytes, at: int) -> int:
        """Where the piece of ``data`` handed over from ``at`` ends: within SLICE bytes, at
        the end of a head that starts there, and not past a body's Content-Length. The
        parser, failing on a request, drops every other one it parsed in the same call:
        a whole request sent in one packet with a malformed one after it went unanswered."""
        stop = at + SLICE
        payload = self.payload
        if payload is None or payload.is_eof():   # what comes is a head, or the rest of one
            found = _BLANK_LINE.search(data, at, stop)
            return found.end() if found else stop
        if self.length is not None:
            return min(stop, at + max(1, self.length - self._taken()))
        # Not past a chunked body's end either: the head of a request sent ahead after it,
        # parsed in the same piece, has its body's first chunks parsed under aiohttp's own
        # limit, before the connection can lower it (``_few_chunks``).
        found = _LAST_CHUNK.search(data, at, stop)
        return found.end() if found else stop

    def _failed_in_body(self, body: Any) -> bool:
        """Whether aiohttp's parser has just failed in ``body``, a body still open (a chunk
        size that is no number, a bare LF, a trailer field it refuses), and if so, tell its
        route. The parser queues its 400 as a request of its own, behind the one whose
        route waits on the body, and never fails the body: the route waited out
        body_timeout_s and answered that the body never came. The body is failed with
        the parser's error (the route answers 400), the queued 400 dropped (it would answer
        no request), and the connection closed after the reply: what follows the fault
        cannot be told apart."""
        inner: Any = self.inner
        messages = inner._messages
        error = getattr(messages[-1][0], "exc", None) if messages else None
        if not isinstance(error, HttpProcessingError) or body.is_eof():
            return False   # no error, or one in a request after the body, which ended whole
        messages.pop()
        self.broken = body
        if body is self.finished:   # its route has answered (a 413 at the head): none is due
            self.limits.close_after_reply(self)
        else:   # its route reads it, or will; closed once that route has answered (_tracked)
            body.set_exception(error)
        # Ended: a route's reads raise the error. aiohttp's own read of what a route that
        # has returned left of it stops here; the error, raised in that read, would be
        # logged as unhandled.
        body.feed_eof()
        return True

    def _refused(self, inner: Any) -> bool:
        """The parser refused a head: its fault is queued as a request, which aiohttp answers
        400 before closing the connection. When aiohttp waits for no other request first,
        the connection is closed after that reply the lingering way (``close_after_reply``),
        as the client may still be sending; behind requests not yet answered, aiohttp's own
        close stays (its loop, ended early, would leave them unanswered)."""
        # aiohttp waits for it (woken by it), or its loop has yet to start (uvloop hands
        # it a new connection's first read before that, on Python 3.11).
        waiter = inner._waiter
        waiting = inner._request_count == 1 if waiter is None \
            else waiter.done() and not waiter.cancelled()
        if len(inner._messages) != 1 or not waiting:
            return False
        if waiter is None:   # marked once that loop has taken the request, or it takes none
            asyncio.get_running_loop().call_soon(self.limits.close_after_reply, self)
        else:
            self.limits.close_after_reply(self)
        return True

    def _taken(self) -> int:
        """Body bytes aiohttp took for the last request it parsed."""
        return 0 if self.payload is None else int(self.payload.total_bytes)

    def _bound(self) -> None:
        """Reading pauses while more than BUF_MAX bytes wait for the lane (a client
        pipelining requests), and resumes once it has caught up."""
        over = len(self.buf) - self.pos > BUF_MAX
        if over != self.paused and self.transport is not None:
            self.paused = over
            if over:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _next(self) -> None:
        """Answer the first request waiting in ``buf`` in the express lane, or hand over."""
        assert self.lane is not None and self.transport is not None
        found = self.lane.match(self.buf, self.pos, self.scan)
        if found == MORE and self.eof or found is None and self.lane.closing:
            # A request the peer stopped sending before its end, or the agent is stopping:
            # the connection is about to close, so what the lane cannot answer is left
            # unread rather than handed to aiohttp, which would store it and have its reply
            # cut off.
            self.transport.close()
        elif found == MORE:
            if self.state == IDLE and self.pos < len(self.buf):
                self.limits.head_started(self)
        elif found is None:
            self._hand_over()
            if self.eof and not self._inner_eof():   # the peer's EOF came during our reply
                self.transport.close()
        else:
            assert not isinstance(found, str)
            request, self.pos = found
            if self.pos == len(self.buf) or self.pos > BUF_MAX:  # drop what was answered
                del self.buf[:self.pos]
                self.pos = 0
            self.serving = True
            self.state = BUSY
            self.lane.serve(self, request)

    def _hand_over(self) -> None:
        """aiohttp's from now on, from the first byte of the request it is given."""
        rest = bytes(self.buf[self.pos:])
        if self.lane is not None:
            self.lane.forget(self)
        self.lane, self.buf, self.pos = None, bytearray(), 0
        self.head, self.edge = 0, b""
        self._bound()
        if rest:
            self._to_inner(rest)

    def replied(self, reply: bytes) -> None:
        self.serving = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(reply)
        self.limits.done(self)
        if self.writable and (self.eof or self.pos < len(self.buf)):
            self._next()
        self._bound()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool | None:
        if self.state == LINGER:
            return None   # the client has sent all it meant to after our last reply: closed
        if self.lane is not None:
            if self.serving:
                self.eof = True
                return True  # closed once the reply is written
            self._hand_over()
        return self._inner_eof()

    def _inner_eof(self) -> bool | None:
        """The peer's EOF on a connection aiohttp has: as ``eof_received``, whose answer
        (falsy: close the transport) it gives."""
        inner: Any = self.inner
        current = inner._current_request
        if self.state == WEBSOCKET or inner._request_count == self.answered \
                or (current is not None and current.writer.output_size):
            # Nothing to answer, or a reply under way (a stream: /tail's) whose end is the
            # client's leaving, EOF or not: closed, aiohttp's way.
            return cast(bool | None, inner.eof_received())
        # Requests taken, not yet answered: a client that shut its side down (SHUT_WR)
        # waits for their replies. Answered, then closed (_tracked); a body left incomplete
        # is refused now, as when the connection is lost. Each is told (CLIENT_EOF).
        self.eof = True
        if current is not None:
            current[CLIENT_EOF] = True
        self.catch_up()   # the body left incomplete may be of a request parsed unseen
        _cut_short(self.payload)
        return True

    def feed_held(self) -> None:
        """Give aiohttp what it held behind an upgrade request whose route answered plainly
        (``_held``), as it would once the route returns, but through ``_feed``: each request
        in it counted as one sent ahead of an answer, and its body followed (parsed by
        aiohttp unseen, the rest of it was counted as header fields, and a client's EOF did
        not cut it short). After that EOF, a body left incomplete is refused."""
        inner: Any = self.inner
        held, inner._message_tail = inner._message_tail, b""
        inner._parser.set_upgraded(False)
        inner._upgraded = False
        self._to_inner(held)
        if inner._buffer_paused:   # paused by what it held: aiohttp resumes it so too
            inner._resume_reading_if_drained()
        if self.eof:
            _cut_short(self.payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.limits.lost(self)
        if self.lane is not None:
            self.lane.forget(self)
        self.inner.connection_lost(exc)
        # aiohttp ends no body once its route has returned: its read and drop of the rest
        # (lingering) would wait out LINGER_S on a connection gone, and a stop with it.
        if self.finished is not None and not self.finished.is_eof():
            self.finished.feed_eof()

    def pause_writing(self) -> None:
        self.writable = False
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.writable = True
        self.inner.resume_writing()
        if self.lane is not None and not self.serving and (self.eof or self.pos < len(self.buf)):
            self._next()
            self._bound()


class ConnectionLimits:
    """The open connections, oldest-idle first, and their deadlines."""

    def __init__(self, cfg: ListenConfig, cap: int, metrics: Metrics,
                 linger_s: float = LINGER_S) -> None:
        self.idle_s = cfg.idle_timeout_s
        self.head_s = cfg.header_timeout_s
        self.linger_s = linger_s
        self.cap = cap
        self.metrics = metrics
        metrics.connections_cap = cap
        self._loop = asyncio.get_running_loop()
        # Insertion order is the order connections last became idle: the first one not
        # BUSY has been idle the longest. Keyed by aiohttp's protocol, which requests carry.
        self._conns: dict[Any, _Conn] = {}
        self._lingering: dict[_Conn, None] = {}   # those in LINGER, the oldest first

    def protocol_factory(self, server: web.Server,
                         lane: ExpressLane | None = None) -> Callable[[], asyncio.Protocol]:
        """What to pass to ``loop.create_server`` in place of ``server`` itself; ``lane``
        answers the plain requests it can before aiohttp's server sees any."""
        # aiohttp's protocols copy the server's handler when created: wrap it first.
        server.request_handler = self._tracked(server.request_handler)
        return lambda: _Conn(self, server(), lane)

    def _tracked(self, handler: ServerHandler) -> ServerHandler:
        conns = self._conns

        async def tracked(request: web.BaseRequest) -> web.StreamResponse:
            conn = conns.get(request.protocol)
            if conn is None:
                return await handler(request)
            conn.state, conn.head = BUSY, -1   # its head is whole
            conn.catch_up(request)
            if conn.eof:   # one taken before the client's EOF, handled since
                request[CLIENT_EOF] = True
            if request.headers.get("Upgrade", "").lower() == "websocket":
                conn.state, conn.active = WEBSOCKET, self._loop.time()
            if conn.behind:   # aiohttp has taken this request off its queue
                conn.read_on()
            conn.go_ahead()   # reading resumed by aiohttp itself (its queue drained)
            try:
                return await handler(request)
            finally:
                conn.finished = request.content
                conn.answered += 1
                inner: Any = request.protocol
                if _held(inner):
                    conn.feed_held()
                # Past a broken body the requests are past telling; after the client's EOF
                # the last one it sent is answered (one held behind a declined upgrade too:
                # with no request whole in it, the connection closes).
                if conn.broken is conn.finished:
                    self.close_after_reply(conn)   # the client may still be sending
                elif conn.eof and inner._request_count == conn.answered:
                    inner.close()
                self._idle(conn)
        return tracked

    def opened(self, conn: _Conn) -> None:
        self._conns[conn.inner] = conn
        self._wait(conn, IDLE, self.idle_s)
        self.metrics.connections_open = len(self._conns)
        if len(self._conns) > self.cap:
            self._evict(conn)

    def now(self) -> float:
        return self._loop.time()

    def head_started(self, conn: _Conn) -> None:
        self._wait(conn, HEAD, self.head_s)

    def head_too_large(self, conn: _Conn) -> None:
        """``conn``'s head is past HEAD_MAX: answered 431 and closed, nothing more parsed.

        A client sends its head before it reads, so more of it is still coming. Closed at
        once, the socket would answer those bytes with a reset, which the client's next
        send or read gets instead of the 431: the 431 is followed by a FIN instead (the
        client may read it and stop), and what still comes read and dropped (LINGER) until
        the client closes or ``linger_s`` has passed (``linger``): a flood of large heads
        holds no more descriptors than the cap."""
        assert conn.transport is not None
        log_limited(log, logging.WARNING, "large-head",
                    "a request head over %d bytes: answered 431, connection closed", HEAD_MAX)
        transport = conn.transport
        transport.write(HEAD_REFUSAL)
        if transport.get_write_buffer_size():
            transport.abort()   # a peer that reads nothing would hold its close for good
            self._count_closed(conn, "large_head")
            return
        self._count("large_head")
        self.linger(conn)

    def close_after_reply(self, conn: _Conn) -> None:
        """aiohttp's request being answered on ``conn`` is its last: once the reply is
        written, closed lingering (``linger``), not by aiohttp, whose close has what the
        client still sends answered with a reset (a client sends its body before it reads)."""
        inner: Any = conn.inner
        task = inner._task_handler
        if task is None:
            inner.close()
            return
        # aiohttp ends its loop after this reply, leaving the close to us (its force_close()
        # would close the transport now, before the reply).
        inner._force_close = True

        def done(task: asyncio.Task[None]) -> None:
            if task.cancelled() and conn.transport is not None:   # the agent is stopping
                conn.transport.abort()
            else:
                self.linger(conn)
        task.add_done_callback(done)

    def linger(self, conn: _Conn) -> None:
        """``conn``'s last reply is written: it is half-closed (a FIN once the reply is
        sent), and what the client still sends read and dropped until it closes or
        ``linger_s`` has passed, so that it reads the reply rather than a reset. Such a
        connection stays in the cap, the first closed to make room."""
        transport = conn.transport
        if transport is None or transport.is_closing():   # closing already (the peer's EOF)
            return
        if conn.eof and not transport.get_write_buffer_size():
            # The client shut its side down first: nothing more can come to read and drop.
            transport.close()
            return
        if not transport.can_write_eof():
            transport.close()
            self.lost(conn)
            return
        try:
            transport.write_eof()
        except OSError:   # the peer's reset came first (asyncio's loops raise it here, ENOTCONN)
            transport.abort()   # nothing left to read or send
            return
        if not transport.is_reading():   # paused by aiohttp, its queue full: read to drop
            transport.resume_reading()
        self._lingering[conn] = None
        conn.state, conn.deadline = LINGER, self._loop.time() + self.linger_s
        if conn.timer is not None:   # one for a later deadline: LINGER's is sooner
            conn.timer.cancel()
        self._arm(conn, self._loop.time())

    def fields_too_large(self, conn: _Conn) -> None:
        """aiohttp was given more than HEAD_MAX bytes of header fields outside a head it
        waited for: closed, with no reply (an earlier request may still be unanswered)."""
        log_limited(log, logging.WARNING, "large-fields",
                    "over %d bytes of header fields outside a request's head (a trailer "
                    "section, or a request sent before the one ahead of it was answered): "
                    "connection closed", HEAD_MAX)
        self._close(conn, "large_head")

    def lost(self, conn: _Conn) -> None:
        conn.transport = None
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self._conns.pop(conn.inner, None)
        self._lingering.pop(conn, None)
        self.metrics.connections_open = len(self._conns)

    def done(self, conn: _Conn) -> None:
        """An express request was answered: the connection is idle again."""
        self._idle(conn)

    def _idle(self, conn: _Conn) -> None:
        if conn.transport is None:
            return
        # Now the most recently idle: to the end of the eviction order.
        del self._conns[conn.inner]
        self._conns[conn.inner] = conn
        self._wait(conn, IDLE, self.idle_s)

    def _wait(self, conn: _Conn, state: int, seconds: float) -> None:
        conn.state = state
        now = self._loop.time()
        conn.deadline = now + seconds
        if conn.timer is None:
            self._arm(conn, now)

    def _arm(self, conn: _Conn, now: float) -> None:
        # A timer never fires more than header_timeout_s away, so a head starting at any
        # moment finds one pending before its deadline: per request, deadlines are floats
        # to update, not timers to cancel and re-create (a timer firing early re-arms).
        conn.timer = self._loop.call_at(min(conn.deadline, now + self.head_s), self._expire, conn)

    def _expire(self, conn: _Conn) -> None:
        conn.timer = None
        if conn.transport is None or conn.state in (BUSY, WEBSOCKET):
            return  # re-armed when the request is done
        now = self._loop.time()
        if conn.state <= HEAD and _routes_on(conn):
            # The client is done: its request is whole here, sent ahead of an answer or
            # behind the rest of a body refused early, and its route begins within a turn
            # or two of the loop, which a loaded one may take longer than the deadline.
            conn.deadline = now + (self.idle_s if conn.state == IDLE else self.head_s)
        if now < conn.deadline:
            self._arm(conn, now)
            return
        if conn.state == LINGER:
            conn.transport.abort()   # counted at its 431
            return
        self._close(conn, "idle" if conn.state == IDLE else "slow_head")

    def _evict(self, newcomer: _Conn) -> None:
        lingering = next(iter(self._lingering), None)
        if lingering is not None and lingering.transport is not None:
            lingering.transport.abort()   # answered, counted and logged at its 431
            self.lost(lingering)
            return
        conns = self._conns.values()
        victim = next((c for c in conns if c.state <= HEAD and c is not newcomer), None)
        what = "the longest-idle one"
        if victim is None:
            sockets = [c for c in conns if c.state == WEBSOCKET]
            victim = min(sockets, key=lambda c: c.active) if sockets else newcomer
            what = "the quietest websocket" if sockets \
                else "the new one, as every other is handling a request"
        log_limited(log, logging.WARNING, "connection-cap",
                    "%d connections open (listen.max_connections): closing %s",
                    self.cap + 1, what)
        self._close(victim, "evicted" if victim is not newcomer else "refused")

    def _close(self, conn: _Conn, reason: str) -> None:
        assert conn.transport is not None
        # abort, not close: close would first wait to flush a reply the peer never reads.
        conn.transport.abort()
        self._count_closed(conn, reason)

    def _count_closed(self, conn: _Conn, reason: str) -> None:
        self.lost(conn)  # its descriptor is released as the transport closes, just after
        self._count(reason)

    def _count(self, reason: str) -> None:
        closed = self.metrics.connections_closed
        closed[reason] = closed.get(reason, 0) + 1
