"""Reading a large Nucleus message as it arrives, keeping only some of its events.

A module sends its whole unacknowledged queue in every message and keeps that queue with
no cap, so after the agent was away one message can hold tens of MiB. Held whole and
parsed, it would take several times its size in memory. Read here chunk by chunk instead:
the first events, up to ``keep`` bytes, are kept as the text they came as (the usual
reader, nucleus_json, and the family's rules then take them as any message); of the
others only the id is looked at. The module resends what was not acknowledged at its
next tick, so each tick shrinks its queue.

A module drops every queued event whose id comes back in `reportedIds`, and ids are small
numbers that collide (1 to 10,000 for nucleus-python, whose queue then holds each id many
times), so an id may be acknowledged only if every event of the message carrying it is
stored. So a later event carrying the id of a kept one is kept too, up to ``most`` bytes
in all; when one does not fit, the ids taken last are given up (their events are not kept,
none is acknowledged) until it does: the first ids of the queue are kept whole, and each
tick acknowledges some.

The whole message is still read, to its end: one that is not JSON is refused whole, as a
small one is. Each value (an event, or a member of the message object) is read in Python,
~1 µs even when it is a bare `0`: a message of more than ``values`` of them is refused
(TooMany) and the rest of it not read, bounding what one message costs.

An event without an id (a heartbeat aside) cannot be left unacknowledged: its client can
only take the reply as "reported". One that is not kept refuses the message (NoId, the
websocket's 1009), as one that cannot be kept refuses a small message: answered, it was
dropped by the agent and by its client alike.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from agent.dialects.body import EVENT_HELD, BodyError
from agent.families import nucleus as family

_DECODER = json.JSONDecoder()
# How near the end of the text read so far a JSON error may be and still be the text
# being cut there (`tru`, `1e`, `"\u00`) rather than a mistake: read again with more.
_CUT = 16
# Bytes of a large message read in one turn of the event loop (nucleus_frames.py feeds a
# slice a turn, and the reader reads once a slice is in): 2,000 values of `0,`, ~3 ms of
# Python, 10-16 ms on a slow 2-core machine, where 16 KiB a turn took 40-110 ms, past the
# 100 ms the loop may be held (tests/test_nucleus_frames.py).
SLICE = 4 * 1024
_RETRY_MIN = SLICE
_NOT_BLANK = re.compile(r"[^ \t\n\r]")
_SCALAR = re.compile(r"[-+.0-9A-Za-z]*")   # what a number or a literal is written with

# Where the reader is in `{"data": [...]}`.
_START, _FIRST_KEY, _KEY, _AFTER_MEMBER, _FIRST_EVENT, _EVENT, _AFTER_EVENT, _END = range(8)


class Split(NamedTuple):
    """A large message, read: ``message`` holds ``kept`` of its ``total`` events, in their
    order, as `{"data": [...]}`; every event carrying the id of one of them is one of them
    but those ``refused``: (id, status, why) of each event over ``keep`` bytes left out as
    one its message would leave out (QueueReader's ``refuses``), as a message's own read
    leaves it out whatever id it shares."""

    message: bytes
    kept: int
    total: int
    refused: tuple[tuple[Any, int, str], ...] = ()


class TooLarge(BodyError):
    """A value too large to read as it arrives (over ``most`` characters), or no event
    that can be kept: the message is refused (the websocket's 1009)."""

    def __init__(self, what: str, keep: int) -> None:
        super().__init__(413, f"{what} is over {keep // 2**20} MiB: too large to store")


class NoId(TooLarge):
    """An event without an id (a heartbeat aside) past the events a large message keeps:
    it can be neither stored nor left unacknowledged (its client, told nothing to resend,
    would drop it), so the message is refused (the websocket's 1009), as a small one
    holding an event without an id that cannot be kept is refused whole."""

    def __init__(self, index: int, keep: int) -> None:
        BodyError.__init__(self, 413, f"data[{index}] has no id and comes after the "
                           f"{keep // 2**20} MiB of events taken of a message over 4 MiB: "
                           "send fewer events at a time")


class TooMany(BodyError):
    """More values in one message than may be read, or events than may be taken (the
    websocket's 1009)."""

    def __init__(self, most: int, what: str = "values", why: str = "too many to read") -> None:
        super().__init__(413, f"over {most:,} {what} in one message: {why}")


class QueueReader:
    """Fed a message's bytes in order (``feed``), then ``finish``: its Split, holding its
    first events up to ``keep`` bytes (the first event alone up to ``most``, the most a
    message may be) and the later ones sharing their ids, up to ``most`` (module doc).
    Both raise BodyError (not JSON; TooLarge: a value over ``most``, or no event to keep;
    NoId, at ``finish``: an event without an id not kept;
    TooMany: over ``values`` values) or families.errors.Invalid (no `data` array).

    ``refuses``: (status, why) for an event, given as its text, that a message holding it
    would leave out (too large for its upstream, say), or None."""

    def __init__(self, keep: int, most: int, values: int,
                 refuses: Callable[[bytes], tuple[int, str] | None] | None = None) -> None:
        self._keep = keep
        self._refuses = refuses
        self._refused: list[tuple[Any, int, str]] = []
        self._most = most     # the most kept in all, and of the first event alone
        self._values = values   # the most values read: events and members of the message
        self._read_values = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._text = ""       # read, not yet taken: at most an unfinished value and a chunk
        self._retry = 0       # length ``_text`` must reach before an unfinished value is read again
        self._state = _START
        self._total = 0
        self._size = 0        # bytes charged for the events kept (_cost)
        self._open = True     # events with an id not seen yet are still kept
        self._groups: dict[Any, list[tuple[int, bytes]]] = {}   # kept (index, text) by id
        self._loose: list[tuple[int, bytes]] = []   # kept events with no id to acknowledge
        self._given_up: set[Any] = set()
        self._has_data = False
        self._no_id: int | None = None   # the first event left out without an id (NoId)

    def feed(self, chunk: bytes | bytearray) -> None:
        self._text += self._decode(chunk, final=False)
        if len(self._text) >= self._retry:
            self._read(final=False)

    def finish(self) -> Split:
        self._text += self._decode(b"", final=True)
        self._read(final=True)
        if not self._has_data:
            family.check({})   # raises Invalid, in the family's words
        if self._no_id is not None:
            raise NoId(self._no_id, self._keep)
        kept = sorted([*self._loose, *(ev for group in self._groups.values() for ev in group)])
        if self._total and not kept:
            raise TooLarge("data[0], with the events sharing its id,", self._most)
        message = b'{"data":[' + b",".join(text for _, text in kept) + b"]}"
        return Split(message, len(kept), self._total, tuple(self._refused))

    def _decode(self, chunk: bytes | bytearray, final: bool) -> str:
        try:
            return self._utf8.decode(chunk, final)
        except UnicodeDecodeError as exc:
            raise BodyError(400, "invalid JSON", f"not UTF-8: {exc.reason}") from None

    def _read(self, final: bool) -> None:
        """Take what ``_text`` holds, up to a value it cuts short (all of it when
        ``final``); that value is read again, whole, once more text is in."""
        text, pos = self._text, 0
        try:
            while (after := self._step(text, pos, final)) is not None:
                pos = after
        except RecursionError:
            raise BodyError(400, "invalid JSON", "nested too deeply") from None
        except json.JSONDecodeError as exc:
            if final or not (exc.pos >= len(text) - _CUT or exc.msg.startswith("Unterminated")):
                raise BodyError(400, "invalid JSON", exc.msg) from None
        pos = _skip(text, pos)   # what is left is the start of a value (or a member)
        member = self._state in (_FIRST_KEY, _KEY)   # a key, ":" and its value
        if len(text) - pos > (2 * self._most + _CUT if member else self._most):
            raise TooLarge("a value" if member else f"data[{self._total}]", self._most)
        self._text = text[pos:]
        # Read again once a quarter more is in: a value cut by many chunks then costs
        # reads in proportion to its size, not to its size times its chunks.
        self._retry = len(self._text) + max(len(self._text) // 4, _RETRY_MIN)

    def _step(self, text: str, pos: int, final: bool) -> int | None:
        """Take the token or value at ``pos`` (after blanks): the position after it, or
        None when ``text`` ends first. Changes nothing unless it takes something."""
        n = len(text)
        pos = _skip(text, pos)
        if pos == n:
            if final and self._state != _END:
                raise json.JSONDecodeError("Unexpected end of message", text, pos)
            return None
        state, c = self._state, text[pos]
        if state == _START:
            if c != "{":
                if c in '["-0123456789tfnNI':
                    family.check(None)   # JSON, but not an object: the family's words
                raise json.JSONDecodeError("Expecting value", text, pos)
            self._state = _FIRST_KEY
            return pos + 1
        if state in (_FIRST_KEY, _KEY):
            if c == "}" and state == _FIRST_KEY:
                self._state = _END
                return pos + 1
            return self._member(text, pos, final)
        if state == _AFTER_MEMBER:
            if c not in ",}":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            self._state = _KEY if c == "," else _END
            return pos + 1
        if state == _FIRST_EVENT and c == "]":
            self._state = _AFTER_MEMBER
            return pos + 1
        if state in (_FIRST_EVENT, _EVENT):
            if not final and _cut(text, pos):
                return None
            value, end = _DECODER.raw_decode(text, pos)
            self._event(value, text, pos, end)
            self._state = _AFTER_EVENT
            return end
        if state == _AFTER_EVENT:
            if c not in ",]":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            self._state = _EVENT if c == "," else _AFTER_MEMBER
            return pos + 1
        raise json.JSONDecodeError("Extra data", text, pos)   # _END

    def _member(self, text: str, pos: int, final: bool) -> int | None:
        """A `"key": value` of the message object, at ``pos``; for `data`, up to its `[`."""
        if text[pos] != '"':
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes",
                                       text, pos)
        key, end = _DECODER.raw_decode(text, pos)   # a string: text[pos] is its quote
        self._count()
        if end - pos > self._most:
            raise TooLarge("a key", self._most)
        colon = _skip(text, end)
        if colon == len(text):
            return None
        if text[colon] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, colon)
        at = _skip(text, colon + 1)
        if at == len(text):
            return None
        if key == "data":
            if self._has_data:
                raise json.JSONDecodeError("`data` given twice", text, pos)
            if text[at] != "[":
                family.check({"data": None})   # raises Invalid, in the family's words
            self._has_data = True
            self._state = _FIRST_EVENT
            return at + 1
        if not final and _cut(text, at):
            return None
        _value, end = _DECODER.raw_decode(text, at)   # another key's: not kept
        if end - at > self._most:
            raise TooLarge(f"`{key}`", self._most)
        self._state = _AFTER_MEMBER
        return end

    def _event(self, value: Any, text: str, start: int, end: int) -> None:
        index = self._total
        self._count()
        if end - start > self._most:   # never kept, nor could it be read as it arrives
            raise TooLarge(f"data[{index}]", self._most)
        self._total += 1
        ev_id = value.get("id") if type(value) is dict else None
        if type(ev_id) not in family.ID_TYPES:   # no id the module could be sent back
            ev_id = None
        group = None if ev_id is None else self._groups.get(ev_id)
        if group is None:   # an id not seen yet (or none): kept while the first events are
            if not self._open or ev_id in self._given_up:
                self._left_out(index, value)
                return
            piece = text[start:end].encode()
            cost = _cost(index, piece)
            if self._refused_alone(ev_id, piece, cost):
                return
            if self._size + cost > (self._keep if self._size else self._most):
                self._open = False
                self._left_out(index, value)
                return
            self._size += cost
            if ev_id is None:
                self._loose.append((index, piece))
            else:
                self._groups[ev_id] = [(index, piece)]
            return
        piece = text[start:end].encode()   # its id's events must all be kept
        cost = _cost(index, piece)
        # But one its message leaves out (ids collide): joined to the id, it took the room
        # of the others, passed ``most`` with them, and the message was refused whole.
        if self._refused_alone(ev_id, piece, cost):
            return
        while self._size + cost > self._most:
            self._open = False
            last, dropped = self._groups.popitem()   # the id taken last is given up
            self._given_up.add(last)
            self._size -= sum(_cost(i, t) for i, t in dropped)
            if last == ev_id:
                return
        self._size += cost
        group.append((index, piece))

    def _refused_alone(self, ev_id: Any, piece: bytes, cost: int) -> bool:
        """Whether the event ``piece``, over ``keep`` bytes, is one its message leaves out
        (``refuses``): noted in ``refused``, and not kept. One its message leaves out is
        resent at every tick, first in its module's queue: kept (it alone, when over
        ``keep``), it took the room of the events after it at each tick, and none was ever
        acknowledged again. Left out here, the room goes to the next event. (One without
        an id refuses its message.)"""
        if (cost > self._keep and ev_id is not None and self._refuses is not None
                and (why := self._refuses(piece)) is not None):
            self._refused.append((ev_id, *why))
            return True
        return False

    def _left_out(self, index: int, value: Any) -> None:
        """Event ``index`` is not kept: it is resent by its module, unless it has no id
        to leave unacknowledged (NoId, at ``finish``; a heartbeat is never stored anyway;
        one whose id is of another type is left unacknowledged, as in a small message)."""
        if self._no_id is None and (type(value) is not dict or (
                value.get("id") is None and family.event_type(value) != "heartbeat")):
            self._no_id = index   # refused once the message is read whole (``finish``)

    def _count(self) -> None:
        self._read_values += 1
        if self._read_values > self._values:
            raise TooMany(self._values)


def _cost(index: int, piece: bytes) -> int:
    """What a kept event is charged: its bytes and a comma, at least body.EVENT_HELD but the
    first. So the ``most`` bytes a large message is charged against the in-flight budget
    (nucleus_frames.py) count its kept events as every route's are counted (at most
    32,768 of them): at 32 bytes each, one message kept 131,072 tiny events, and an
    `outpost run` went 133 MB past idle for it alone (42 MB at 128)."""
    return len(piece) + 1 if not index else max(len(piece) + 1, EVENT_HELD)


def _cut(text: str, pos: int) -> bool:
    """Whether the number or literal at ``pos`` may go on past the end of ``text`` (`10.`
    would read as 10, `tru` as an error)."""
    scalar = _SCALAR.match(text, pos)
    return text[pos] not in '{["' and scalar is not None and scalar.end() == len(text)


def _skip(text: str, pos: int) -> int:
    """The position after the blanks at ``pos`` (a regex: a long run of them costs C time)."""
    found = _NOT_BLANK.search(text, pos)
    return len(text) if found is None else found.start()
