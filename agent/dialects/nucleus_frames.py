"""The Nucleus websocket: a large message read as it arrives, never held whole.

aiohttp reads a websocket message whole before handing it over, and at its peak that
takes about three times the message's size (the pieces received, joined, then unmasked
into a copy). A module sends its whole queue in one message, tens of MiB after a long
absence of the agent. So on each Nucleus connection a thin reader sits in front of
aiohttp's: it follows the frames' headers and hands aiohttp every frame but a large one (a
whole text or binary message in one frame, over ``large`` bytes), which it reads itself as
it arrives into a QueueReader (nucleus_queue.py: some events kept, at most ``large``
bytes, the rest only looked at). In its place aiohttp is handed a small stand-in frame, so
the handler meets the result in the message's place among the others
(``QueueSocket.taken``). Its values are read in Python, a few ms a chunk for real events
but ~0.7 s a MiB of tiny ones (`0,`): so at most ``SLICE`` bytes of it are read in one turn
of the event loop, the connection's reading paused until the rest of the socket read is
done, a slice a turn (``_Gate._next``), and the reader stops reading after ``values`` values
(nucleus_queue.py). Like an HTTP body, a large message has ``deadline`` seconds
(listen.body_timeout_s) to arrive whole: a stalled sender would hold its share of the
in-flight budget as long as it stayed connected.

A large message is charged ``large`` bytes, the most it keeps, to the in-flight budget
(agent/server/admission.py) from its first byte: one that does not fit while other bodies
are in flight is read to its end without keeping anything and refused busy. A module sends
its queue every tick, answered or not, so a connection's messages are taken one at a time:
a large one is not read while an earlier message of the connection waits for its answer
(``QueueSocket.answered``), or the two would count against each other and the later one be
refused busy with nothing else in flight; once the connection closes (a refusal is a close),
one is skipped, on to the module's close frame. One over
``cap`` is refused at its header, without reading it.

A message in several frames (a text or binary frame, then continuation frames: Chromium,
so a browser page or an Electron renderer, where the modules use the page's WebSocket,
writes every message over about 128 KiB in frames of 131,000 bytes) is gathered here too
(``_Fragments``), unmasked: up to ``large`` bytes it is handed to aiohttp as one frame, as
if it had come so; past that it is read as a large message in one frame is, the bytes
gathered first and then the rest, a slice a turn; over ``cap``, refused. Left to aiohttp,
such a message over ``large`` bytes was closed with 1009, and its module sent it again,
larger, at every tick. A message in one frame of ``CHARGED_MIN`` bytes or more, up to
``large``, is gathered here the same way.

A gathered message is charged to the in-flight budget as each of its frames' headers comes
(up to ``large`` bytes; past it, the large reader's charge covers what it keeps) and has
``deadline`` seconds from its first byte: one that does not fit is refused busy, the rest
of it skipped. aiohttp reads a frame whole, uncharged and with no deadline, before the
handler sees it: each connection that stalled inside a message of up to ``large`` bytes
held that much for as long as it stayed open, 4 GiB at the connection cap. Below
``CHARGED_MIN`` a frame goes to aiohttp as it comes (64 MiB at the cap).

The hook is aiohttp's (3.14) parser slot on the connection's protocol, which a websocket
fills once upgraded: the thin reader takes the place of aiohttp's own reader there and
passes it the frames it does not keep for itself, byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, ExitStack, suppress
from typing import Any, NamedTuple

from aiohttp import WebSocketError, WSCloseCode, web
from aiohttp.http_websocket import WebSocketWriter

from agent.dialects.body import BodyError, Busy, Reservation
from agent.dialects.nucleus_queue import SLICE, QueueReader, Split
from agent.dialects.replies import masked
from agent.families.errors import Invalid
from agent.logs import log_limited

log = logging.getLogger("outpost.nucleus")

_CONTINUATION, _TEXT, _BINARY = 0x0, 0x1, 0x2
_XOR = [bytes(a ^ b for a in range(256)) for b in range(256)]
Ticket = Callable[[], AbstractContextManager[Reservation]]
# QueueReader's ``refuses``: (status, why) for an event its message would leave out.
Refuses = Callable[[bytes], tuple[int, str] | None]
# A message in one frame this large or larger is gathered and charged here (module doc).
CHARGED_MIN = 64 * 1024
# A first fragment of a text message, unmasked, of one byte: what aiohttp is shown of a
# message gathered here once a frame that cannot continue it comes (``_Gate._turn``).
_OPEN_FRAGMENT = bytes([_TEXT, 1]) + b" "


def close_reason(message: str) -> bytes:
    """A websocket close reason: at most 123 bytes, cut on a character boundary (cut inside
    one, it is invalid UTF-8, and the client fails the connection instead of reading it)."""
    return message.encode()[:123].decode("utf-8", "ignore").encode()


class OverCap(Exception):
    """A message over the cap, refused at its header (the websocket's 1009)."""

    def __init__(self, size: int, cap: int) -> None:
        super().__init__(f"a {size / 2**20:.1f} MiB message is over the {cap // 2**20} MiB "
                         "a Nucleus websocket message may be")
        self.size = size


class Late(Exception):
    """A large message not received whole within its deadline (listen.body_timeout_s)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"message not received whole within {seconds:g} s "
                         "(listen.body_timeout_s)")


class Taken(NamedTuple):
    """What became of one large message: its Split, or why it is refused (BodyError,
    Invalid, Busy, OverCap); ``hold`` keeps its share of the in-flight budget until
    closed. ``size``: its bytes. ``error`` may also be Late."""

    split: Split | None
    error: Exception | None
    size: int
    hold: ExitStack


class QueueSocket(web.WebSocketResponse):
    """A Nucleus websocket whose large messages are read as they arrive (module doc).

    Messages up to ``large`` bytes come as aiohttp gives them; for each larger one, a
    binary stand-in frame that ``taken`` turns into its Taken. The handler must call
    ``drop`` when it ends (the results' shares of the budget are given back).

    A reply or pong the client has not taken within ``deadline`` cuts the connection
    (``_in_time``): one that sends but never reads held it, with its last message and
    reply in memory, for good.

    ``refuses``: QueueReader's, for each large message's reader."""

    def __init__(self, *, key: str, large: int, cap: int, keep: int, values: int,
                 deadline: float, ticket: Ticket, refuses: Refuses | None = None) -> None:
        # aiohttp refuses a frame of max_msg_size bytes or more: one of ``large`` is its.
        super().__init__(max_msg_size=large + 1, autoping=True, compress=False)
        self._key = key
        self._limits = (large, cap, keep, values, deadline)
        self.ticket = ticket
        self.refuses = refuses
        self._stand_in = os.urandom(16)
        self._results: deque[Taken] = deque()
        self._dropped = False
        self._transport: asyncio.Transport | None = None
        self._protocol: Any = None   # aiohttp's, for its flow control (``read_on``)
        self._gate: _Gate | None = None
        self.handed = 0      # messages passed on toward the handler
        self._answered = 0   # ... of which the handler is done with

    def taken(self, data: str | bytes) -> Taken | None:
        """The result a binary message of ``data`` stands for, or None: a message of its own."""
        if data == self._stand_in and self._results:
            return self._results.popleft()
        return None

    def unanswered(self) -> bool:
        return self._answered < self.handed

    def answered(self) -> None:
        """The handler is done with a message: a large one waiting behind it is read on."""
        self._answered += 1
        if self._gate is not None and not self.unanswered():
            self._gate.go_on()

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"",
                    drain: bool = True) -> bool:
        """Closed (the handler's refusal, say) with a large message waiting behind the one
        refused: read on, or the module's close frame would wait behind it too, and the
        closing handshake until aiohttp gives up on it (10 s). Closed by aiohttp for a
        broken frame (1002, 1007, 1009): its reason is what aiohttp found wrong, which
        aiohttp sends none of."""
        if self._gate is not None:
            self._gate.go_on()   # its turn comes once the close has begun (``closed``)
        if not message and self._reader is not None:
            fault = self._reader.exception()
            if isinstance(fault, WebSocketError) and fault.code == code:
                message = close_reason(str(fault))
        return await super().close(code=code, message=message, drain=drain)

    async def send_str(self, data: str, compress: int | None = None) -> None:
        await self._in_time(super().send_str(data, compress))

    async def pong(self, message: bytes = b"") -> None:
        # aiohttp's receive() answers a ping so: once cut, its next read ends the connection.
        with suppress(ConnectionResetError):
            await self._in_time(super().pong(message))

    async def _in_time(self, sending: Awaitable[None]) -> None:
        """``sending`` done; aiohttp waits for a frame to be written out only once the
        socket's buffers are full, so a client that took nothing within the deadline reads
        no more: the connection is cut (no close frame could reach it) and
        ConnectionResetError raised. It reconnects and resends what was not acknowledged."""
        deadline = self._limits[4]
        try:
            async with asyncio.timeout(deadline):
                await sending
        except TimeoutError:
            if self._transport is not None:
                self._transport.abort()
            log_limited(log, logging.WARNING, f"deaf:{self._key}",
                        "websocket of app %s cut: it read none of the agent's replies "
                        "within %g s (listen.body_timeout_s)", masked(self._key), deadline)
            raise ConnectionResetError("the client reads no replies") from None

    def drop(self) -> None:
        """The handler is done: give back what results not taken, or yet to come, hold."""
        self._dropped = True
        while self._results:
            self._results.popleft().hold.close()

    def _post_start(self, request: web.BaseRequest, protocol: str | None,
                    writer: WebSocketWriter) -> None:
        proto: Any = request.protocol
        self._transport = request.transport
        self._protocol = proto
        early, proto._message_tail = proto._message_tail, b""   # frames sent ahead of the 101
        super()._post_start(request, protocol, writer)
        gate = self._gate = _Gate(proto._payload_parser, self, proto.close, *self._limits)
        proto._payload_parser = gate
        if early:
            gate.feed_data(early)

    def pause(self) -> None:
        """Read no more of this connection until ``read_on``: the event loop (libuv's, in
        uvloop) reads a connection up to 32 times in a row when data keeps coming, and
        each slice of a large message costs up to ~10 ms here."""
        transport = self._transport
        if transport is not None and transport.is_reading():
            transport.pause_reading()

    def read_on(self) -> None:
        """Read the connection on, unless aiohttp's own flow control holds it (its queue of
        messages is full, or its output buffer): aiohttp resumes it once the handler has
        caught up. Resumed under aiohttp's hold, the connection was read on while aiohttp
        took it for paused and never paused it again, so a module sending faster than its
        messages were stored was read into memory without bound."""
        transport = self._transport
        proto: Any = self._protocol
        if (transport is not None and not transport.is_closing() and not transport.is_reading()
                and not (proto is not None and (proto._reading_paused
                                                or getattr(proto, "_buffer_paused", False)))):
            transport.resume_reading()

    def stand_in(self, taken: Taken) -> bytes:
        """A frame standing in for ``taken``: final, binary, unmasked."""
        if self._dropped:   # read during the closing handshake: nothing will take it
            taken.hold.close()
        else:
            self._results.append(taken)
        return bytes([0x80 | _BINARY, len(self._stand_in)]) + self._stand_in


class _Large:
    """One large message being read: its payload unmasked and fed to a QueueReader."""

    def __init__(self, size: int, mask: bytes | None, keep: int, most: int, values: int,
                 ticket: Ticket, refuses: Refuses | None = None) -> None:
        self.size = size
        self.mask = mask
        self.offset = 0
        self.hold = ExitStack()
        self.error: Exception | None = None
        self.reader: QueueReader | None = QueueReader(keep, most, values, refuses)
        try:   # the most it may keep (one event up to ``most``)
            self.hold.enter_context(ticket()).take(most)
        except Busy as exc:   # read to its end, nothing kept: then refused
            self.error, self.reader = exc, None

    def feed(self, piece: memoryview) -> None:
        if self.reader is None:
            return
        data = _unmasked(piece, self.mask, self.offset)
        self.offset += len(data)
        try:
            self.reader.feed(data)
        except (BodyError, Invalid) as exc:
            self.error, self.reader = exc, None

    def finish(self) -> Taken:
        split = None
        if self.reader is not None:
            try:
                split = self.reader.finish()
            except (BodyError, Invalid) as exc:
                self.error = exc
            self.reader = None
        return Taken(split, self.error, self.size, self.hold)


class _Fragments:
    """A message in several frames, being gathered (module doc): its payload so far,
    unmasked, in ``buf`` (from ``fed`` on, what its ``large`` reader has yet to read, once
    it passed ``large`` bytes). ``done``: its result is out, or it has none (it came while
    the connection was closing): the rest of it is skipped. ``hold``: its share of the
    in-flight budget (its large reader's, once it has one)."""

    def __init__(self, opcode: int, skip: bool, ticket: Ticket) -> None:
        self.opcode = opcode
        self.hold = ExitStack()
        self.ticket = None if skip else self.hold.enter_context(ticket())
        self.charged = 0         # bytes taken on ``ticket``
        self.buf = bytearray()
        self.fed = 0
        self.size = 0            # payload bytes received
        self.large: _Large | None = None
        self.mask: bytes | None = None   # the current frame's
        self.offset = 0          # in the current frame
        self.fin = False         # the current frame is its last
        self.complete = False    # its last byte is in
        self.done = skip

    def frame(self, mask: bytes | None, fin: bool) -> None:
        """The next of its frames begins."""
        self.mask, self.offset, self.fin = mask, 0, fin

    def behind(self, most: int) -> bool:
        """Its large reader has more than ``most`` bytes yet to read: read no more input."""
        return self.large is not None and len(self.buf) - self.fed > most


class _Gate:
    """In aiohttp's parser slot: follows the frames and hands aiohttp all but the large
    ones, which ``_Large`` reads (module doc). Called by aiohttp's protocol as its reader."""

    def __init__(self, inner: Any, sock: QueueSocket, close: Callable[[], None], large: int,
                 cap: int, keep: int, values: int, deadline: float) -> None:
        self._inner = inner
        self._sock = sock
        self._close = close     # the connection's, when aiohttp's reader is done with it
        self._large_min, self._cap, self._keep = large + 1, cap, keep
        self._values, self._deadline = values, deadline
        self._pending = b""     # the rest of a read, for the next turns (module doc)
        self._paced = False     # a next turn is due (``_next``, one at a time), reading paused
        self._waiting = False   # a gathered or large message is next, behind unanswered ones
        self._timer: asyncio.TimerHandle | None = None   # the gathered or large message's
        self._head = b""        # a frame header cut by the end of a read
        self._left = 0          # payload bytes of the current frame still to come
        self._large: _Large | None = None
        self._skip = False      # the current frame's payload is dropped (over the cap)
        self._fragmented = False   # aiohttp's reader is inside a message in fragments
        self._frag: _Fragments | None = None   # a message in fragments, gathered here
        self._in_frag = False   # the current frame's payload is one of its fragments

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._paced or self._waiting:   # read on (aiohttp resumed it): after the turn due
            self._pending += data
            self._sock.pause()
            return False, b""
        return self._turn(data)

    def go_on(self) -> None:
        """Every message before the waiting large one is answered: read it now."""
        if self._waiting:
            self._waiting, self._paced = False, True   # what comes meanwhile waits for it
            asyncio.get_running_loop().call_soon(self._next)

    def _next(self) -> None:
        data, self._pending, self._paced = self._pending, b"", False
        if (data or self._frag is not None) and self._turn(data)[0]:
            self._close()
        elif not self._paced:   # nothing left for a later turn: read the connection on
            self._sock.read_on()

    def _turn(self, data: bytes) -> tuple[bool, bytes]:
        """Read ``data`` up to SLICE bytes of a large message; the rest in later turns."""
        out: list[bytes] = []   # for aiohttp's reader, in order
        run = pos = 0           # data[run:pos]: bytes for aiohttp not yet in ``out``
        n = len(data)
        budget = SLICE
        while True:
            frag = self._frag
            if frag is not None:
                budget = self._digest(frag, budget, out)
                if self._frag is not None and (frag.complete or frag.behind(self._large_min)):
                    break   # the rest waits for its reading to catch up (or to finish)
            if pos >= n:
                break
            if self._left and self._in_frag:
                assert frag is not None
                take = min(self._left, n - pos)
                out.append(data[run:pos])
                out.append(self._gather(frag, memoryview(data)[pos:pos + take]))
                run = pos = pos + take
                self._left -= take
                if not self._left:
                    self._in_frag = False
                    frag.complete = frag.fin
                continue
            if self._left:
                take = min(self._left, n - pos)
                if self._large is not None or self._skip:
                    if self._large is not None and self._large.reader is not None:
                        if not budget:
                            break
                        take = min(take, budget)
                        budget -= take
                    out.append(data[run:pos])
                    if self._large is not None:
                        self._large.feed(memoryview(data)[pos:pos + take])
                    run = pos + take
                pos += take
                self._left -= take
                if not self._left:
                    if self._large is not None:
                        self._end_deadline()
                        out.append(self._sock.stand_in(self._large.finish()))
                    self._large, self._skip = None, False
                continue
            head = self._head + data[pos:pos + 14 - len(self._head)]
            size = _head_size(head)
            if size is None or len(head) < size:   # the read ends inside a header
                out.append(data[run:pos])
                self._head, run, pos = head, n, n
                break
            used, held = size - len(self._head), self._head
            self._head = b""
            first, length = head[0], _length(head)
            opcode = first & 0x0F
            mask = head[size - 4:size] if head[1] & 0x80 else None
            if self._frag is not None and not opcode & 0x08:   # a data frame, in its midst
                out.append(data[run:pos])
                run = pos
                if opcode == _CONTINUATION and not first & 0x70:   # its next fragment
                    pos = run = pos + used
                    self._left, self._in_frag = length, length > 0
                    self._frag.frame(mask, bool(first & 0x80))
                    self._frag.complete = not length and self._frag.fin
                    self._charge(self._frag, length, out)
                    continue
                # Not a fragment of it: aiohttp is told a message in fragments is open,
                # and fails the connection on this frame (1002), as it would have. The
                # fragment it is told of holds a byte: after an empty one, aiohttp takes
                # a final text or binary frame for a message of its own.
                self._drop_frag()
                out.append(_OPEN_FRAGMENT)
                self._fragmented = True
            elif (opcode in (_TEXT, _BINARY) and not first & 0x70 and not self._fragmented
                    and (not first & 0x80 or CHARGED_MIN <= length < self._large_min)):
                # the first of a message's fragments, or a message to gather (module doc)
                out.append(data[run:pos])
                closing = self._sock.closed
                if not closing and self._sock.unanswered():   # read again, header and all
                    self._waiting = True
                    self._pending = held + data[pos:]
                    run = pos = n
                    break
                pos = run = pos + used
                frag = self._frag = _Fragments(opcode, closing, self._sock.ticket)
                frag.frame(mask, bool(first & 0x80))
                self._left, self._in_frag = length, length > 0
                if not closing:
                    self._sock.handed += 1
                    self._timer = asyncio.get_running_loop().call_later(self._deadline,
                                                                        self._expire)
                    self._charge(frag, length, out)
                continue
            if (opcode in (_TEXT, _BINARY) and first & 0x80 and not first & 0x70
                    and not self._fragmented and length >= self._large_min):
                out.append(data[run:pos])
                closing = self._sock.closed
                if not closing and self._sock.unanswered():   # read again, header and all
                    self._waiting = True
                    self._pending = held + data[pos:]
                    run = pos = n
                    break
                pos = run = pos + used
                self._left = length
                if closing:   # nothing will take it: skipped on to the module's close frame
                    self._skip = True
                    continue
                self._sock.handed += 1
                if length > self._cap:
                    self._skip = True
                    out.append(self._sock.stand_in(
                        Taken(None, OverCap(length, self._cap), length, ExitStack())))
                else:
                    self._large = _Large(length, mask, self._keep, self._large_min - 1,
                                         self._values, self._sock.ticket, self._sock.refuses)
                    self._timer = asyncio.get_running_loop().call_later(self._deadline,
                                                                        self._expire)
                continue
            if held:   # pos == run == 0: the header's start precedes this read
                out.append(held)
            if opcode in (_TEXT, _BINARY):
                self._fragmented = not first & 0x80
            elif opcode == _CONTINUATION and first & 0x80:
                self._fragmented = False
            if opcode in (_TEXT, _BINARY, _CONTINUATION) and first & 0x80:
                self._sock.handed += 1   # a message's last frame
            self._left = length
            pos += used
        out.append(data[run:pos])
        if not self._waiting:
            self._pending = data[pos:]
        whole = b"".join(out)
        done = self._inner.feed_data(whole) if whole else (False, b"")
        if self._waiting:
            self._sock.pause()
        elif (self._pending or (self._large is not None and self._large.reader is not None)
              or (self._frag is not None and self._frag.fed < len(self._frag.buf)
                  and self._frag.large is not None)):
            self._sock.pause()   # the others served before this connection is read on
            self._paced = True
            asyncio.get_running_loop().call_soon(self._next)
        return done

    def _gather(self, frag: _Fragments, piece: memoryview) -> bytes:
        """A piece of the payload of ``frag``'s current frame, gathered; what to hand
        aiohttp (its refusal, once it is over the cap)."""
        frag.size += len(piece)
        if frag.done:
            return b""
        frag.buf += _unmasked(piece, frag.mask, frag.offset)
        frag.offset += len(piece)
        if frag.size > self._cap:
            frag.large = None
            self._end_deadline()
            frag.done, frag.buf, frag.fed = True, bytearray(), 0
            return self._sock.stand_in(Taken(None, OverCap(frag.size, self._cap), frag.size,
                                             frag.hold))
        if frag.large is None and frag.size >= self._large_min:   # read as a large message
            frag.hold.close()   # its own charge: the large reader's covers what it keeps
            frag.large = _Large(0, None, self._keep, self._large_min - 1, self._values,
                                self._sock.ticket, self._sock.refuses)
            frag.hold = frag.large.hold
        return b""

    def _charge(self, frag: _Fragments, length: int, out: list[bytes]) -> None:
        """A frame of ``length`` bytes of ``frag`` begins: charged, up to ``large`` bytes in
        all; when it does not fit, ``frag`` is refused busy and the rest of it skipped."""
        n = min(length, self._large_min - frag.charged)
        if frag.done or frag.ticket is None or frag.large is not None or n <= 0:
            return
        try:
            frag.ticket.take(n)
        except Busy as exc:
            self._end_deadline()
            frag.done, frag.buf = True, bytearray()
            out.append(self._sock.stand_in(Taken(None, exc, frag.size, frag.hold)))
            return
        frag.charged += n

    def _digest(self, frag: _Fragments, budget: int, out: list[bytes]) -> int:
        """``frag`` read on, up to ``budget`` bytes; once whole and read, its frame (or
        stand-in) put in ``out``. The budget left."""
        large = frag.large
        if frag.done or large is None:
            if frag.complete:
                if not frag.done:   # within ``large``: to aiohttp, as if in one frame
                    self._end_deadline()
                    frag.hold.close()   # the handler charges the message as it takes it
                    out.append(_frame(frag.opcode, frag.buf))
                self._frag = None
            return budget
        if large.reader is None:   # refused (busy, not JSON): the rest is not read
            frag.buf, frag.fed = bytearray(), 0
        else:
            take = min(budget, len(frag.buf) - frag.fed)
            if take:
                large.feed(memoryview(bytes(frag.buf[frag.fed:frag.fed + take])))
                frag.fed += take
                budget -= take
                if frag.fed > len(frag.buf) // 2:
                    del frag.buf[:frag.fed]
                    frag.fed = 0
        if frag.complete:
            self._end_deadline()   # received whole: the rest is this agent's time
            if large.reader is None or frag.fed == len(frag.buf):
                large.size = frag.size
                out.append(self._sock.stand_in(large.finish()))
                self._frag = None
        return budget

    def _drop_frag(self) -> None:
        frag, self._frag = self._frag, None
        self._in_frag = False
        if frag is not None:
            self._end_deadline()
            frag.hold.close()

    def _expire(self) -> None:
        """The deadline of the message gathered or read passed: its result is Late, the rest
        of it skipped."""
        self._timer = None
        frag = self._frag
        if frag is not None and not frag.done:
            late = Taken(None, Late(self._deadline), frag.size, frag.hold)
            frag.large, frag.done, frag.buf, frag.fed = None, True, bytearray(), 0
            if self._inner.feed_data(self._sock.stand_in(late))[0]:
                self._close()
            return
        large, self._large = self._large, None
        if large is None:
            return
        self._skip = True
        late = Taken(None, Late(self._deadline), large.size, large.hold)
        if self._inner.feed_data(self._sock.stand_in(late))[0]:
            self._close()

    def _end_deadline(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def feed_eof(self) -> None:
        self._end_deadline()
        self._pending = b""
        if self._large is not None:   # cut short: never a result
            self._large.hold.close()
            self._large = None
        self._drop_frag()
        self._inner.feed_eof()


def _unmasked(piece: memoryview | bytes, mask: bytes | None, offset: int) -> bytearray:
    """A copy of ``piece``, unmasked with ``mask`` from ``offset`` in its frame."""
    data = bytearray(piece)
    if mask is not None:
        for i in range(4):
            data[i::4] = data[i::4].translate(_XOR[mask[(offset + i) % 4]])
    return data


def _frame(opcode: int, payload: bytes | bytearray) -> bytes:
    """A final, unmasked frame of ``payload``."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, 127]) + struct.pack("!Q", n)
    return head + payload


def _head_size(head: bytes) -> int | None:
    """A frame header's length in bytes, once its first two bytes are in."""
    if len(head) < 2:
        return None
    flag = head[1] & 0x7F
    return 2 + (2 if flag == 126 else 8 if flag == 127 else 0) + (4 if head[1] & 0x80 else 0)


def _length(head: bytes) -> int:
    flag = head[1] & 0x7F
    if flag == 126:
        return int(struct.unpack_from("!H", head, 2)[0])
    if flag == 127:
        return int(struct.unpack_from("!Q", head, 2)[0])
    return flag

