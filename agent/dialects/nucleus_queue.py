"""Reading a large Nucleus message as it arrives, keeping only its first events.

A module sends its whole unacknowledged queue in every message and keeps that queue with
no cap, so after the agent was away one message can hold tens of MiB. Held whole and
parsed, it would take several times its size in memory. Read here chunk by chunk instead:
the events that fit in ``keep`` bytes are kept as the text they came as (the usual reader,
nucleus_json, and the family's rules then take them as any message); of each later event
only the id is looked at, and nothing of it is kept. The module resends what was not
acknowledged at its next tick, so each tick shrinks its queue.

A module drops every queued event whose id comes back in `reportedIds`, and ids are small
numbers that collide, so the id of a kept event that a later event carries too is
withheld: acknowledged, it would take that later event out of the queue, never stored. The
kept event is stored (the spool's dedupe keeps it once however often it comes) and its id
is acknowledged at a later tick, once no event left behind carries it.

The whole message is still read, to its end: one that is not JSON is refused whole, as a
small one is.
"""

from __future__ import annotations

import codecs
import json
from typing import Any, NamedTuple

from agent.dialects.body import BodyError
from agent.families import nucleus as family

_DECODER = json.JSONDecoder()
_SPACE = " \t\n\r"
_ID_TYPES = (int, float, str)   # exact types: others are never acknowledged (family.fault)
# How near the end of the text read so far a JSON error may be and still be the text
# being cut there (`tru`, `1e`, `"\u00`) rather than a mistake: read again with more.
_CUT = 16
_RETRY_MIN = 64 * 1024

# Where the reader is in `{"data": [...]}`.
_START, _FIRST_KEY, _KEY, _AFTER_MEMBER, _FIRST_EVENT, _EVENT, _AFTER_EVENT, _END = range(8)


class Split(NamedTuple):
    """A large message, read: ``message`` holds its first ``kept`` events as
    `{"data": [...]}`, of ``total``; ``withheld``, the ids of kept events that a later
    event carries too."""

    message: bytes
    kept: int
    total: int
    withheld: frozenset[Any]


class TooLarge(BodyError):
    """A value too large to be kept, which no later message can take either: the
    websocket's 1009."""

    def __init__(self, what: str, keep: int) -> None:
        super().__init__(413, f"{what} is over {keep // 2**20} MiB: too large to store")


class QueueReader:
    """Fed a message's bytes in order (``feed``), then ``finish``: its Split. Both raise
    BodyError (not JSON; TooLarge) or families.errors.Invalid (no `data` array)."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._text = ""       # read, not yet taken: at most an unfinished value and a chunk
        self._retry = 0       # length ``_text`` must reach before an unfinished value is read again
        self._state = _START
        self._kept = bytearray(b'{"data":[')
        self._n_kept = 0
        self._total = 0
        self._keeping = True
        self._ids: set[Any] = set()
        self._withheld: set[Any] = set()
        self._has_data = False

    def feed(self, chunk: bytes | bytearray) -> None:
        self._text += self._decode(chunk, final=False)
        if len(self._text) >= self._retry:
            self._read(final=False)

    def finish(self) -> Split:
        self._text += self._decode(b"", final=True)
        self._read(final=True)
        if not self._has_data:
            family.check({})   # raises Invalid, in the family's words
        if self._total and not self._n_kept:
            raise TooLarge("data[0]", self._keep)
        self._kept += b"]}"
        return Split(bytes(self._kept), self._n_kept, self._total, frozenset(self._withheld))

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
        if len(text) - pos > self._keep:
            event = self._state in (_FIRST_EVENT, _EVENT)
            raise TooLarge(f"data[{self._total}]" if event else "a value", self._keep)
        self._text = text[pos:]
        # Read again once a quarter more is in: a value cut by many chunks then costs
        # reads in proportion to its size, not to its size times its chunks.
        self._retry = len(self._text) + max(len(self._text) // 4, _RETRY_MIN)

    def _step(self, text: str, pos: int, final: bool) -> int | None:
        """Take the token or value at ``pos`` (after blanks): the position after it, or
        None when ``text`` ends first. Changes nothing unless it takes something."""
        n = len(text)
        while pos < n and text[pos] in _SPACE:
            pos += 1
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
            value, end = _DECODER.raw_decode(text, pos)
            if end == n and not final:
                return None   # a number may go on in the next chunk
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
        _value, end = _DECODER.raw_decode(text, at)   # another key's: not kept
        if end == len(text) and not final:
            return None
        self._state = _AFTER_MEMBER
        return end

    def _event(self, value: Any, text: str, start: int, end: int) -> None:
        self._total += 1
        ev_id = value.get("id") if type(value) is dict else None
        if type(ev_id) not in _ID_TYPES:
            ev_id = None
        if self._keeping:
            piece = text[start:end].encode()
            if len(self._kept) + len(piece) + 3 <= self._keep:   # with "," and "]}"
                if self._n_kept:
                    self._kept += b","
                self._kept += piece
                self._n_kept += 1
                if ev_id is not None:
                    self._ids.add(ev_id)
                return
            self._keeping = False   # the events kept are the first ones, in order
        if ev_id is not None and ev_id in self._ids:
            self._withheld.add(ev_id)


def _skip(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in _SPACE:
        pos += 1
    return pos
