"""The express lane: plain local-app POSTs to the busiest ingest routes (Segment's single
calls and SDK batches), answered without aiohttp's request machinery.

aiohttp's request objects, router and response writer cost a 1-event request about
200k instructions (its own hello-world takes 202k: `python -m bench.callgrind_ingest
--ref hello`), more than the request's real work (parse, validate, commit), and an SDK's
batch of 15-20 events a sixth of its cost. So every
connection starts in this lane (server/connections.py). A request is answered here only
when its head is a strict subset of HTTP/1.1 that nothing downstream treats specially:
`POST` to a path a dialect offers here (dialects/base.py ``Express``), no query, one
`Content-Length` and the whole body in hand, no browser headers (`Origin`, Fetch
Metadata: the guard's CORS and cross-site checks stay aiohttp's), no `Transfer-Encoding`,
`Content-Encoding`, `Expect` or `Upgrade`, no repeated field of those read here or of
those aiohttp's parser refuses twice (_ONCE), no more fields than aiohttp takes
(FIELDS_MAX), a loopback `Host`. It then runs what app.py's wrapper runs around the
same handler code: the body ticket, the refusal count, the handler's reply, written byte
for byte as aiohttp writes it.

Anything else hands the connection to aiohttp for good, from the first byte of that
request: every byte is parsed by exactly one of the two parsers, so they cannot disagree
on where a request ends (request smuggling), and whatever is odd gets aiohttp's
handling and the documented error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from email.utils import formatdate
from typing import Final, Literal, NamedTuple, Protocol

import orjson
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from agent.dialects.auth import BadAuth, basic_user
from agent.dialects.base import Express
from agent.dialects.body import TICKET
from agent.dialects.replies import REFUSALS, Fixed
from agent.metrics import Metrics
from agent.server.admission import Admission, Ticket
from agent.server.guard import Guard

log = logging.getLogger("outpost.server")

HEAD_MAX = 8192  # aiohttp's own default limit for a request line and for each field
# aiohttp's limit on a head's fields (the agent's server sets it: service.py); it answers
# a head of more with a 400, which such a head must get here too.
FIELDS_MAX = 128
# Larger bodies rarely come whole in one read: aiohttp reads them. Each route still
# applies its own limit (32 KB a Segment message).
BODY_MAX = 64 * 1024
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]++"
_VALUE = rb"[\t\x20-\x7e\x80-\xff]*+"
# A head is `POST <path> HTTP/1.1`, then `token:value` lines, each ended by CRLF, then
# CRLF. Checked a line at a time: a line already read (ExpressLane._lines) fits, and a
# path found among the routes fits _PATH. Possessive (*+, ++): no backtracking to try.
_PATH = re.compile(rb"/[^\x00-\x20?#%\x7f-\xff]*+")
_LINE = re.compile(_TOKEN + rb":" + _VALUE)
_REQUEST_LINE_END = b" HTTP/1.1"
# A head not yet whole is read on, packet by packet, as far as it goes (_may_start): its
# path, the rest of its request line, then its fields' lines. Each part's first byte that
# cannot be in it:
_PATH_END = re.compile(rb"[\x00-\x20?#%\x7f-\xff]")
_NAME_END = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
_VALUE_END = re.compile(rb"[^\t\x20-\x7e\x80-\xff]")
_LINE_TAIL = b" HTTP/1.1\r\n"
# Where reading stopped: in the path, where the line's tail starts, at a line's start, in
# a field's name, in its value.
_IN_PATH, _AT_TAIL, _AT_LINE, _IN_NAME, _IN_VALUE = range(5)
# The fields read here; a request that repeats one goes to aiohttp.
_READ = frozenset({b"content-length", b"connection", b"host", b"authorization"})
# Fields not read here that aiohttp's parser answers 400 to when repeated (its
# SINGLETON_HEADERS): a head that repeats one goes there, for that 400. Passed over
# here, the lane stored what the same request got refused on any other connection.
_ONCE = frozenset({b"content-type", b"user-agent", b"content-location", b"content-range",
                   b"etag", b"max-forwards", b"server"})
# Fields whose handling is aiohttp's or the guard's: a request with one goes there
# (Sec-WebSocket-Key1, the old websocket handshake's, is a 400 in aiohttp's parser).
_ELSEWHERE = frozenset({b"origin", b"sec-fetch-site", b"transfer-encoding",
                        b"content-encoding", b"expect", b"upgrade", b"sec-websocket-key1"})
# A field line's reading (ExpressLane._read) is kept by the line: an app sends the same
# lines at every request. Enough for an app's usual lines and its bodies' sizes (a
# Content-Length line each); at most 256 KiB of lines.
LINES_KEPT = 512
LINE_KEPT_MAX = 512
_LENGTH_DIGITS = 6   # at most, read as a number (BODY_MAX has 5): a longer one is aiohttp's
# A head's verdict (ExpressLane._judge) is kept by the head too: an app sends the same
# head at every request of a body's size, and judged line by line a head cost ~14k
# instructions (callgrind). At most 512 KiB of heads.
VERDICTS_KEPT = 512
HEAD_KEPT_MAX = 1024
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n\r\n".encode()
HEADS_KEPT = 64
MORE: Final = "more"  # the request is not all here yet


class HeadScan:
    """How far the lane has read a connection's head not yet whole: the next packet's read
    goes on from there. Read again from the request's start at each packet, a head sent a
    byte a packet cost the loop time quadratic in its length (about 0.2 s for 8 KB)."""

    __slots__ = ("at", "phase", "pos")

    def __init__(self) -> None:
        self.pos = -1   # where the head read starts in the buffer; -1: none is being read
        self.at = 0
        self.phase = _IN_PATH


def _may_start(buf: bytearray, pos: int, scan: HeadScan) -> bool:
    """Whether the bytes from ``buf[pos]`` on (``POST /`` and more, not a whole head: no
    CRLF CRLF) may yet begin one that fits (above); read on from where ``scan`` stopped."""
    if scan.pos != pos:
        scan.pos, scan.at, scan.phase = pos, pos + 6, _IN_PATH
    at, phase, n = scan.at, scan.phase, len(buf)
    while at < n:
        if phase == _IN_PATH:
            at = found.start() if (found := _PATH_END.search(buf, at)) else n
            phase = _AT_TAIL if at < n else phase
        elif phase == _AT_TAIL:   # kept where the tail starts until it is all here
            tail = buf[at:at + len(_LINE_TAIL)]
            if not _LINE_TAIL.startswith(tail):
                return False
            if len(tail) < len(_LINE_TAIL):
                break
            at, phase = at + len(_LINE_TAIL), _AT_LINE
        elif phase == _AT_LINE:
            if buf[at] == 13:   # the blank line's CR: with its LF the head would be whole
                if at + 1 < n:
                    return False
                break   # kept on the CR: the byte after it is read next time
            if _NAME_END.match(buf, at):
                return False
            phase = _IN_NAME
        elif phase == _IN_NAME:
            at = found.start() if (found := _NAME_END.search(buf, at)) else n
            if at < n:
                if buf[at] != 58:   # ":"
                    return False
                at, phase = at + 1, _IN_VALUE
        else:
            at = found.start() if (found := _VALUE_END.search(buf, at)) else n
            if at < n:
                if buf[at] != 13:
                    return False
                if at + 1 == n:
                    break   # kept on the CR: the byte after it is read next time
                if buf[at + 1] != 10:
                    return False
                at, phase = at + 2, _AT_LINE
    scan.at, scan.phase = at, phase
    return True


def _text(value: bytes) -> str:
    """A field's value as aiohttp's parser gives it to the routes (UTF-8, other bytes as
    lone surrogates), so that both lanes judge and cache the same string."""
    return value.decode("utf-8", "surrogateescape")


# The route, its refusal counter, the body and the write keys the headers gave: a plain
# tuple, as a NamedTuple's construction is a Python call (~3k instructions a request).
Request = tuple[Express, Callable[[int], None], bytes, list[str]]
# A head that fits: its route and refusal counter, its body's size, the key its
# Authorization names (None: none); False: aiohttp's.
Verdict = tuple[tuple[Express, Callable[[int], None]], int, str | None] | Literal[False]


class Routes(NamedTuple):
    """One dialect's express routes, and its refusal counter (as app.py passes it)."""

    routes: Mapping[str, Express]
    refuse: Callable[[int], None]


class Connection(Protocol):
    def replied(self, reply: bytes) -> None: ...
    def abort(self) -> None: ...


class ExpressLane:
    """Matches heads against the express routes and answers the requests that fit."""

    def __init__(self, routes: list[Routes], guard: Guard, admission: Admission,
                 metrics: Metrics) -> None:
        # Only paths that fit _PATH: another could never be asked for here.
        self._routes = {path.encode(): (route, r.refuse)
                        for r in routes for path, route in r.routes.items()
                        if _PATH.fullmatch(path.encode())}
        self._guard = guard
        self._admission = admission
        self._metrics = metrics
        # Each connection's task (one request at a time), while the connection is the
        # lane's; those waiting for their next request (None: none comes, the task ends),
        # a request given while its task was busy (only ever while it writes a reply, and
        # taken as that write returns: never held across an await, so no cancel or reset
        # can leave one here), and the tasks to end once idle.
        self._tasks: dict[Connection, asyncio.Task[None]] = {}
        self._waiting: dict[Connection, asyncio.Future[Request | None]] = {}
        self._next: dict[Connection, Request] = {}
        self._forgotten: set[Connection] = set()
        self._closing = False
        self._date = (0, b"")
        self._lines: dict[bytes, tuple[bytes, str] | bool] = {}   # _read's, by the line
        self._verdicts: dict[bytes, Verdict] = {}   # _judge's, by the head
        self._heads: dict[object, bytes] = {}   # a reply's head by (status, *fields) or Fixed
        self._whole: dict[object, tuple[bytes, bytes]] = {}   # a Fixed's reply, by its Date

    def match(self, buf: bytearray, pos: int,
              scan: HeadScan) -> tuple[Request, int] | str | None:
        """The request that starts at ``buf[pos]`` and where it ends; MORE when it may
        still fit once more bytes come; None when it is aiohttp's. ``scan``: the
        connection's, how far its head was read while not whole."""
        if self._closing or not self._routes:
            return None
        if not buf.startswith(b"POST /", pos):
            return MORE if b"POST /".startswith(buf[pos:pos + 6]) else None
        resumed = scan.pos == pos
        # Read on: a CRLF CRLF not there at the last read has a byte past where it stopped.
        end = buf.find(b"\r\n\r\n", scan.at - 3 if resumed else pos, pos + HEAD_MAX)
        if end < 0:
            # A head that already breaks the grammar (a bare CR or LF, a missing blank
            # line) may never show CRLF CRLF: aiohttp's to answer, at once.
            return MORE if len(buf) - pos < HEAD_MAX and _may_start(buf, pos, scan) else None
        if resumed:
            scan.pos = -1   # the next request read may start at the same place
        head = bytes(buf[pos:end])
        verdict = self._verdicts.get(head)
        if verdict is None:
            verdict = self._judge(head)
            if len(head) <= HEAD_KEPT_MAX:
                if len(self._verdicts) >= VERDICTS_KEPT:
                    self._verdicts.clear()
                self._verdicts[head] = verdict
        if not verdict:
            return None
        found, size, user = verdict
        total = end + 4 + size
        if len(buf) < total:
            return None  # the body is still coming: aiohttp reads it, with its deadline
        return (*found, bytes(buf[end + 4:total]), [user] if user else []), total

    def _judge(self, head: bytes) -> Verdict:
        """Whether ``head`` (its CRLF CRLF left out) fits: its route, its body's size and
        the key its Authorization names, or False if it is aiohttp's. A function of the
        head's bytes alone, kept by the head (``match``)."""
        # The head's lines (no CRLF CRLF within it: a line is never empty), each checked
        # once: a regex over the whole head was ~7k instructions a request (callgrind).
        lines = head.split(b"\r\n")
        first = lines[0]
        if len(lines) > FIELDS_MAX + 1 or not first.endswith(_REQUEST_LINE_END):
            return False
        found = self._routes.get(first[5:-9])   # after "POST ", before " HTTP/1.1"
        if found is None:
            return False
        fields: dict[bytes, str] = {}
        for line in lines[1:]:
            field = self._lines.get(line)
            if field is None:
                if _LINE.fullmatch(line) is None:
                    return False
                field = self._read(line)
            if field is True:
                return False
            if field:
                key, value = field
                if key in fields:
                    return False
                fields[key] = value
        length = fields.get(b"content-length")
        # No Host: HTTP/1.1 requires one, and aiohttp answers 400 to a request without it.
        if length is None or b"host" not in fields:
            return False
        size = int(length)
        if size > BODY_MAX:
            return False
        return found, size, fields.get(b"authorization")

    def _read(self, line: bytes) -> tuple[bytes, str] | bool:
        """A field line (`token:value`, _LINE) as the lane reads it: the name lowered and
        the value as text, if read here (Authorization's: the key it names, or ""); True
        if aiohttp's, for its name or its value (a Content-Length of no digits or too
        many, a Connection other than keep-alive, a Host the guard refuses, an
        Authorization naming no key, which aiohttp's route refuses with the reason);
        a field of _ONCE as its name and "", so that a repeat is seen; False if neither
        (ignored). Kept by the line: read, a line cost ~3k instructions."""
        name, _, raw = line.partition(b":")
        key = name.lower()
        field: tuple[bytes, str] | bool = key in _ELSEWHERE
        if key in _ONCE:
            field = (key, "")
        elif key in _READ:
            value = raw.strip(b" \t")
            text = _text(value)
            if key == b"content-length":
                ok = len(value) <= _LENGTH_DIGITS and value.isdigit()
            elif key == b"connection":
                ok = value.lower() == b"keep-alive"
            elif key == b"host":
                ok = self._guard.host_ok(text)
            else:
                try:
                    text = basic_user(text) or ""
                except BadAuth:
                    ok = False
                else:
                    ok = True
            field = (key, text) if ok else True
        if len(line) <= LINE_KEPT_MAX:
            if len(self._lines) >= LINES_KEPT:
                self._lines.clear()
            self._lines[line] = field
        return field

    @property
    def closing(self) -> bool:
        return self._closing

    def serve(self, conn: Connection, request: Request) -> None:
        """Answer ``request``, by ``conn``'s own task: the one answering its last request,
        or made now. A task made and ended for each request cost ~1% of a single call more
        than a future waking the connection's (callgrind)."""
        waiting = self._waiting.pop(conn, None)
        if waiting is not None:
            waiting.set_result(request)
        elif conn in self._tasks:   # its reply just went out: taken once the task is back
            self._next[conn] = request
        else:
            # Named: a task made without a name formats one of its own ("Task-123"), 2k
            # instructions, on Python 3.11.
            self._tasks[conn] = asyncio.Task(self._serve(conn, request),
                                             loop=asyncio.get_running_loop(), name="express")

    def forget(self, conn: Connection) -> None:
        """``conn`` is closed, or aiohttp's now: its task ends, once its requests are answered."""
        waiting = self._waiting.pop(conn, None)
        if waiting is not None:
            waiting.set_result(None)
        elif conn in self._tasks:
            self._forgotten.add(conn)

    async def _serve(self, conn: Connection, request: Request) -> None:
        """``conn``'s requests, one at a time, until it is forgotten or the lane closes.
        Each answered here, not by a coroutine of its own: ~2k instructions a request."""
        loop = asyncio.get_running_loop()
        resp: web.Response | Fixed | None = None
        # One ticket for all of this task's requests, each answered before the next starts
        # and giving back all it took as it ends: set once in the task's own context, as
        # the refusal counter is while its route's stays the same. Made and set for each
        # request, the three cost a single call ~2k instructions (1%, callgrind).
        ticket = Ticket(self._admission)
        TICKET.set(ticket)
        counting: Callable[[int], None] | None = None
        try:
            while True:
                route, count, body, given = request
                if count is not counting:
                    counting = count
                    REFUSALS.set(count)
                try:
                    try:
                        resp = await route(body, given)
                    finally:
                        ticket.release()
                    if resp.status >= 400:
                        count(resp.status)
                    reply = self.render(resp)
                except Exception:
                    log.exception("an express request failed")
                    count(500)
                    reply = self.render(web.Response(
                        body=orjson.dumps({"error": "internal error, see the agent's log"}),
                        status=500, content_type="application/json"))
                self._metrics.express_requests += 1
                try:
                    # Writing it may start the connection's next request (serve, above).
                    conn.replied(reply)
                except Exception:  # the connection's own bookkeeping: never leave it hanging
                    log.exception("an express reply could not be written")
                    conn.abort()
                sent = self._next.pop(conn, None)
                if sent is not None:
                    # Sent before that reply (pipelined): answered in the loop's next turn,
                    # as a task of its own was, not before every other connection's.
                    await asyncio.sleep(0)
                    request = sent
                elif self._closing or conn in self._forgotten:
                    return
                else:
                    # Nothing of the last request held while the connection is idle (its
                    # body: up to BODY_MAX).
                    del request, body, reply
                    resp = None
                    waiting = self._waiting[conn] = loop.create_future()
                    if (given_next := await waiting) is None:
                        return
                    # Not left in given_next too: held through the next wait.
                    request, given_next = given_next, None
        finally:
            del self._tasks[conn]
            self._waiting.pop(conn, None)
            self._forgotten.discard(conn)

    def render(self, reply: web.Response | Fixed) -> bytes:
        """``reply`` as aiohttp writes it on a keep-alive HTTP/1.1 connection."""
        key: object
        date = self._http_date()
        if isinstance(reply, Fixed):   # built once: its head is found by the object itself
            # The same bytes until the Date line changes: built once a second, not at every
            # request (~4k instructions a stored single call, callgrind).
            whole = self._whole.get(reply)
            if whole is not None and whole[0] is date:
                return whole[1]
            resp, key = reply.response, reply
        else:
            resp, key = reply, (reply.status, *reply.headers.items())
        body = resp.body
        if not isinstance(body, bytes):
            raise TypeError(f"an express reply's body must be bytes, not {type(body)}")
        head = self._heads.get(key)
        if head is None:  # a handful of distinct replies: each head is built once
            lines = [f"HTTP/1.1 {resp.status} {resp.reason}\r\n"]
            lines += [f"{name}: {value}\r\n" for name, value in resp.headers.items()]
            head = "".join(lines).encode("latin-1")
            if len(self._heads) >= HEADS_KEPT:
                self._heads.clear()
                self._whole.clear()
            self._heads[key] = head
        out = b"%sContent-Length: %d\r\n%s%s%s" % (head, len(body), date, _SERVER, body)
        if key is reply:
            self._whole[key] = (date, out)
        return out

    def _http_date(self) -> bytes:
        now = int(time.time())
        if now != self._date[0]:
            self._date = (now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode())
        return self._date[1]

    async def close(self, timeout: float) -> None:
        """Take no more requests, and let those being answered finish (their events
        commit and their replies go out before aiohttp closes the connections)."""
        self._closing = True
        for conn in list(self._waiting):
            self.forget(conn)
        if self._tasks:
            with suppress(TimeoutError):
                await asyncio.wait(list(self._tasks.values()), timeout=timeout)
