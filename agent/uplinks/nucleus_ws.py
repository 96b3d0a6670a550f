"""Nucleus over a websocket: frames out, `reportedIds` back, several batches in flight.

The connection is opened by ``connecting``, which the forwarder calls before it prepares
a batch (so that a retry against an upstream that is down builds no batch), or else
on first use, and kept; a heartbeat goes out after 60 s without traffic, as the
official modules do.

FIFO across drops. Frames leave in the order the forwarder took
their batches (one lock, acquired in that order). Once a batch on a connection
fails (the connection drops, its acks do not come in time, or its send is cut
short: a stop's cancel), that connection is done: every later send fails at
once, without connecting, because a later
batch must not reach the upstream before the earlier one is sent again. Only
``close()``, which the forwarder calls once every in-flight batch has settled,
lets the next send open a new connection. A connection that dropped while every
batch sent on it was acknowledged (an idle drop) is replaced without a failure; one
that dropped before its first frame (an upstream that closes each connection at once)
fails the send, so that each retry costs one handshake, not two.

An upstream that stops reading (a wedged server or proxy: its TCP window closes) leaves
a send waiting for room in the buffers. A send is given ``timeout_s``; one that cannot
finish in it fails its connection, which is then cut (aborted, not closed gracefully:
a graceful close waits for those same buffers to drain), and that releases every send
waiting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from itertools import repeat
from typing import Any, ClassVar

import aiohttp
import orjson

from agent.logs import log_limited
from agent.settings import UpstreamConfig
from agent.spool.types import Row
from agent.uplinks import splice
from agent.uplinks.base import (
    Acked,
    Refused,
    Retry,
    SendResult,
    UplinkBase,
    proxy_refused,
    to_check,
)
from agent.uplinks.http_common import (
    HandshakeRefused,
    connect_wait,
    described,
    excerpt,
    html_instead_of_reply,
    media_type,
    reply_cap,
    reply_json,
    retry_after,
    through,
)
from agent.uplinks.nucleus_frame import NucleusFraming, frame, ids_only, match, track_url
from agent.uplinks.prepare import Prepared, take_prefix
from agent.uplinks.proxy import Proxy

log = logging.getLogger("outpost.uplink.nucleus_ws")
HEARTBEAT_S = 60.0
# How long a close waits for the upstream's half of the handshake: one that has
# stopped answering is not worth more (the connection is then simply cut).
CLOSE_GRACE_S = 1.0
LOST = "connection lost before all acks arrived"
STOPPED_READING = "upstream stopped reading"
CUT_SHORT = "a send was cut short"
_REASON_SHOWN = 123   # characters of a close frame's reason shown (its most, in bytes)


class _Link:
    """One connection attempt: its websocket, the acks that came on it, and whether
    frames may still go on it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse | None, grace: float,
                 lost: str | None = None, retry_after: float | None = None):
        self.ws = ws
        self.grace = grace
        self.lost = lost          # why no more frames may go on it
        self.retry_after = retry_after   # the Retry-After of a refused handshake
        self.failed = lost is not None  # a batch sent on it was not wholly acknowledged
        self.close_reason = ""    # what the upstream's close frame said, if it sent one
        self.sending = 0          # sends on it that have not returned yet
        self.writing = 0          # frames (heartbeats too) waiting for room in its buffers
        self.carried = False      # a frame went out on it
        # The connection ended under its frames with no close frame, and not by us: cut (a
        # reset, a proxy's or server's wait for a frame run out), not closed.
        self.dropped = False
        # Frames sent on it (heartbeats too), and how many of them were answered: the
        # upstream answers frames in order, so a frame whose reply came has been answered
        # for (_on_message counts them).
        self.frames = 0
        self.replies = 0
        self.acked: set[int] = set()
        # Frames one reply acknowledged whole, by number: their seqs are not put in
        # ``acked`` (a set insert, lookup and removal an event: ~4% of the event loop's
        # instructions in a drain).
        self.whole: set[int] = set()
        # Frame number -> seqs, from just before the frame goes out until its send returns:
        # only their events can an answer acknowledge (_acked).
        self.waiting: dict[int, Sequence[int]] = {}
        # The frame being written, or whose write failed (0: none): the upstream has not
        # had it whole, so no answer can be its (an earlier answer sent again, naming an
        # id it reuses, acknowledged it, and a failed write then deleted it unsent).
        self.going = 0
        self.sizes: dict[int, int] = {}   # their bytes, by number, while they wait
        # The frame the upstream closed the connection for with 1009 (too big): see
        # _refused_frame.
        self.too_big: int | None = None
        self.said = ""   # the last reply of other JSON than reportedIds ({"error": ...})
        # Replies that were no answer (not counted in ``replies``) since the count was last
        # known in step: at most as many frames may have been answered by them (_acked).
        self.no_answers = 0
        # Frames taken as answered by such replies (skipped past): answered, and yet no
        # verdict on their events, which are not weighed as left out.
        self.unanswered: set[int] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def changed(self, timeout: float) -> None:
        """Wait for an ack or the loss. Callers check their condition first, then call
        this without yielding in between, so a change cannot slip through."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        # Not wait_for: on Python 3.11 a cancel that comes as ``fut`` is set (a stop
        # cutting several sends short, the first of which loses the link) is swallowed,
        # and the send it was meant to cut ended as a failure instead.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await fut

    def all_acked(self, n: int, seqs: Sequence[int]) -> bool:
        """Whether every event of frame ``n`` (``seqs``) has been acknowledged (issuperset
        walks the seqs as they are: no set of them is built)."""
        return n in self.whole or self.acked.issuperset(seqs)

    def lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
        self.notify()

    async def send(self, data: bytes, timeout: float) -> None:
        """Send a frame; one that finds no room within ``timeout`` (the upstream stopped
        reading) loses the link, and cuts it."""
        assert self.ws is not None
        self.writing += 1
        timer = asyncio.timeout(timeout)
        try:
            async with timer:
                await _send_text(self.ws, data)
        except TimeoutError:
            if timer.expired():
                self.lose(f"{STOPPED_READING}: a frame could not be sent within {timeout:g}s")
                self.abort()
            raise
        except asyncio.CancelledError:
            # Cut short with the frame partly on its way: what of it still waits in the
            # buffers never goes (nor anything after it), and its events go again.
            self.lose(CUT_SHORT)
            self.abort()
            raise
        finally:
            self.writing -= 1

    def abort(self) -> None:
        """Cut the connection now, which releases every send waiting for room in its
        buffers. aiohttp's close, even cancelled, closes the transport gracefully: that
        waits for the same buffers to drain, and the sends with it."""
        # aiohttp has no public abort: its writer's transport (3.x). Were it gone in some
        # version, the link is lost all the same, and the blocked send ends with the session.
        transport = getattr(getattr(self.ws, "_writer", None), "transport", None)
        if transport is not None:
            transport.abort()

    async def close_ws(self) -> None:
        if self.ws is None or self.ws.closed:
            return
        if self.writing:   # a close frame would wait behind the frame that cannot go
            self.abort()
            return
        # Not wait_for, which on Python 3.11 drops a cancel that lands as the close ends.
        try:
            async with asyncio.timeout(self.grace):
                await self.ws.close()
        except TimeoutError:   # no answer to the close, or no room to send it in
            self.abort()

    async def close(self) -> None:
        self.lose("closed")
        await self.close_ws()
        # Cut whatever the close left: one aiohttp made gracefully (answering the upstream's
        # close frame) waits for the bytes still unsent, to an upstream that may read no more:
        # that connection, and its buffers, stayed open for good, one more at each retry.
        self.abort()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class NucleusWsUplink(NucleusFraming, UplinkBase):
    """One websocket to `{url}/app/{key}/track`."""

    prepares_ahead: ClassVar[bool] = False   # prepare puts the batch's ids in flight

    def __init__(self, cfg: UpstreamConfig, app_key: str, session: aiohttp.ClientSession,
                 machine_id: str, heartbeat_s: float = HEARTBEAT_S) -> None:
        super().__init__(cfg, app_key, session, machine_id)
        self.url = track_url(cfg.url, cfg.key or app_key)
        self.heartbeat_s = heartbeat_s
        # Connection state: the ack id of every event prepared on this connection and not
        # yet acknowledged (a failed frame's, until close()) -> its seq. Ids are unique
        # among them, so that an answer names one event (_acked).
        self.in_flight: dict[Any, int] = {}
        self._link: _Link | None = None
        self._send_lock = asyncio.Lock()
        self._last_sent = 0.0

    @classmethod
    def window(cls, cfg: UpstreamConfig) -> int:
        """Pipelined: frames leave in order on one connection (see the module docstring)."""
        return cfg.max_in_flight

    def prepare(self, rows: Sequence[Row]) -> Prepared:
        """As the shared take loop, stopping before an id still in flight; the batch's
        ids are in flight from now on, so the next batch cannot reuse them."""
        prepared = (splice.take(self, rows, self.in_flight)
                    or take_prefix(self, rows, self.in_flight))
        self.in_flight.update(zip(prepared.ids, prepared.seqs))
        return prepared

    def acknowledged(self, prepared: Prepared) -> tuple[int, ...]:
        """A frame's events are acknowledged as replies come (``_on_message``), before
        its send returns: these must survive a stop that cuts the send short."""
        link = self._link
        if link is None:
            return ()
        if any(n in link.whole for n, seqs in link.waiting.items() if seqs is prepared.seqs):
            return tuple(sorted(prepared.seqs))
        return tuple(sorted(link.acked.intersection(prepared.seqs)))

    def connecting(self) -> Coroutine[Any, Any, Retry | None] | None:
        # An open connection needs no opening: None keeps the forwarder from giving back the
        # slots of a read it is sending (it keeps one for a handshake), which dropped the
        # rest of the read to be read and unpacked again whenever every frame was answered.
        link = self._link
        if link is not None and link.lost is None and link.ws is not None \
                and not link.ws.closed:
            return None
        return self._connect()

    async def _connect(self) -> Retry | None:
        """Open the websocket before a batch is prepared for it: with the upstream down,
        a retry fails here, before its batch is built (Segment events: mapped)."""
        async with self._send_lock:
            link = await self._usable_link(replace_unused=True)
        return None if link.lost is None else Retry(link.lost, retry_after=link.retry_after)

    async def send(self, prepared: Prepared) -> SendResult:
        size = 0   # the frame's bytes, once sent
        stalled = False   # the frame found no room to go within timeout_s
        mine = 0   # this frame's number on the link; 0: not sent
        async with self._send_lock:  # FIFO: batches start in the order they were prepared
            link = await self._usable_link(replace_unused=False)
            link.sending += 1   # undone by _settled, whichever way the send ends
            try:
                if link.ws is not None and link.lost is None:
                    try:
                        link.carried = True
                        # Numbered before the await: a heartbeat sent meanwhile comes after it.
                        link.frames += 1
                        mine = link.frames
                        link.waiting[mine] = prepared.seqs
                        data = frame(prepared)
                        size = link.sizes[mine] = len(data)
                        link.going = mine
                        await link.send(data, self.cfg.timeout_s)
                        link.going = 0
                        self._last_sent = asyncio.get_running_loop().time()
                    except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError) as exc:
                        stalled = isinstance(exc, TimeoutError)
                        link.dropped |= isinstance(exc, ConnectionError) and link.lost is None
                        link.lose(f"send failed: {described(exc, self.proxy)}")
            except BaseException:
                # Cut short as its frame went (a stop's cancel while it waited for room),
                # or a bug: left counted, the link was never replaced once lost.
                _cut_short(link, mine, prepared.seqs)
                _settled(link, mine)
                raise
        try:
            error = await self._wait_acks(link, mine, prepared.seqs)
            unanswered = mine in link.unanswered   # (forgotten as the send settles)
            # No answer to it in time on a connection still up, or no room to send it: a
            # link too slow for a frame this large, as likely as a hang. Smaller ones
            # follow (stream.py), else each try of it would time out alike, for good. Not
            # a frame a reply that was no answer ({"error": ...}) may have answered: that
            # one came, at once maybe, and its like would come for a smaller frame too.
            too_slow = bool(mine) and link.replies < mine and (stalled or (
                error is not None and link.lost is None and not unanswered
                and link.replies + link.no_answers < mine))
            # The connection cut as the upstream took this frame (every one before it
            # answered): a slow link's far end that gave up on it (Retry.dropped). Not the
            # frames behind it, lost with it: one cut is one.
            dropped = error is not None and link.dropped and mine == link.replies + 1
        except BaseException:
            _cut_short(link, mine, prepared.seqs)
            raise
        finally:
            whole = _settled(link, mine)
        if error is None:  # every one acked: no per-event sorting or intersection
            if not whole:
                link.acked.difference_update(prepared.seqs)
            return Acked(prepared.seqs)
        acked = tuple(sorted(link.acked.intersection(prepared.seqs)))
        link.acked.difference_update(acked)
        # Timed out on a live connection that answered the frame: left out, not lost. Not
        # one answered by a reply that was no answer ({"error": ...}): as over HTTP, that
        # weighs nothing, else an event such replies kept coming for went to dead letters.
        got = set(acked)
        omitted = tuple(s for s in prepared.seqs if s not in got) \
            if mine and link.lost is None and link.replies >= mine \
            and not unanswered else ()
        too_big = link.too_big == mine   # (frames are numbered from 1: never 0, unsent)
        if too_big and len(prepared.seqs) == 1:
            # Given up: its id is free again (the upstream's 1009 ended the connection, so
            # no ack for it can come).
            self.in_flight.pop(prepared.ids[0], None)
        else:
            # Sent again: nothing sent after it may go on a new connection first. (An event
            # alone in a frame too big is given up, and overtakes nothing.) Its ids stay in
            # flight until close(): an ack for it read while this connection closes would be
            # taken for an event prepared meanwhile with one of them, and delete it unsent.
            link.failed = True
        link.lose(error)
        # Ids are only unique per connection: a late ack on this one could match
        # a different event that reuses the id after the resend, so start afresh.
        await link.close_ws()
        if too_big and len(prepared.seqs) == 1:
            return Refused(f"{error}: the upstream takes no frame this long ({size} bytes, "
                           "one event)")
        return Retry(error, retry_after=link.retry_after, acked=acked, omitted=omitted,
                     too_big=size if too_big else None, too_slow=too_slow and not too_big,
                     dropped=dropped and not too_big)

    async def _wait_acks(self, link: _Link, mine: int, wanted: Sequence[int]) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.timeout_s
        while not link.all_acked(mine, wanted):
            if link.lost is not None:
                return link.lost if link.lost != "closed" else LOST
            remaining = deadline - loop.time()
            if remaining <= 0:
                error = (f"no reportedIds for {len(set(wanted) - link.acked)} events within "
                         f"{self.cfg.timeout_s:g}s")
                if link.said:
                    error += f"; the upstream said {link.said}"
                # A frame still waits for room: the upstream reads nothing, so never answers.
                return f"{STOPPED_READING}: {error}" if link.writing else error
            await link.changed(remaining)
        return None

    async def _usable_link(self, replace_unused: bool) -> _Link:
        """The connection for the next frame (a dead one, if it must not be replaced yet).

        A dead one that never carried a frame is replaced only by ``connecting``, the
        start of an attempt: lost between that and the send, the upstream closed it at
        once, and the send fails on it."""
        link = self._link
        if link is not None and link.ws is not None and link.ws.closed:
            link.lose(_closed(link, link.ws))   # its reader may not have run since the close
        if (link is not None and link.lost is not None and not link.failed and not link.sending
                and (link.carried or replace_unused)):
            await link.close()  # every batch sent on it was acknowledged: none can be overtaken
            link = None
        if link is None:
            link = self._link = await self._open()
        return link

    async def _open(self) -> _Link:
        if self.unsendable is not None:   # no connection to another path
            return _Link(None, 0, lost=self.unsendable)
        # ws_connect's own timeouts do not cover the handshake: bound it here. Not wait_for:
        # on Python 3.11 it drops a cancel (a stop's) that lands as the handshake completes,
        # and the send then went on, waiting timeout_s for its acks.
        timer = asyncio.timeout(self.cfg.timeout_s)
        try:
            async with timer:
                # A reply answers one frame: read up to what the largest frame's answer
                # may need.
                proxied, added = through(self.proxy, self.url)
                ws = await self.session.ws_connect(
                    self.url, timeout=aiohttp.ClientWSTimeout(ws_close=5),
                    max_msg_size=reply_cap(self.cfg.batch_max_bytes, self.cfg.batch_max_events),
                    autoping=True, heartbeat=None, headers=added, **proxied)
        except aiohttp.WSServerHandshakeError as exc:
            why, wait = _handshake_refused(exc, self.proxy)
            return _Link(None, 0, lost=f"connect failed: {why}", retry_after=wait)
        except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError) as exc:
            # A redirect is an UpstreamRedirect here: the session never follows one.
            wait = connect_wait(exc)
            # The bound's own timeout: no connection, or no answer to the upgrade request.
            why = (f"no websocket handshake within {self.cfg.timeout_s:g}s (timeout_s)"
                   if timer.expired() else described(exc, self.proxy))
            return _Link(None, 0, lost=f"connect failed: {why}", retry_after=wait)
        link = _Link(ws, min(CLOSE_GRACE_S, self.cfg.timeout_s))
        # The handshake is traffic: the first heartbeat is due a minute after it, not now
        # (``connecting`` opens the link before the first frame is even prepared).
        self._last_sent = asyncio.get_running_loop().time()
        link.tasks = [asyncio.create_task(self._guard(link, self._read(link, ws)),
                                          name=f"ws-read-{self.name}"),
                      asyncio.create_task(self._guard(link, self._heartbeats(link, ws)),
                                          name=f"ws-heartbeat-{self.name}")]
        # Debug: a key's loop ends when idle, so an app sending now and then reconnects often.
        log.debug("connected to %s", self.name)
        return link

    async def _guard(self, link: _Link, work: Awaitable[None]) -> None:
        """Run one of a connection's own tasks. A bug in it goes to the forwarder's
        supervisor (``on_crash``) and ends the connection; waiting sends fail."""
        try:
            await work
        except Exception as exc:  # noqa: BLE001 - handed to the supervisor
            link.lose(f"uplink error: {type(exc).__name__}")
            self.on_crash(exc)
            await link.close_ws()

    async def _read(self, link: _Link, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            # Not ``async for``: it ends at the close frame without handing over its reason.
            while True:
                msg = await ws.receive()
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    self._on_message(link, msg.data)
                elif msg.type is aiohttp.WSMsgType.ERROR:   # too long (max_msg_size), garbled
                    link.lose(f"the upstream's reply could not be read: {msg.data}")
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    link.close_reason = str(msg.extra or "")
                    # The upstream's own 1009 (not ours, for a reply over max_msg_size).
                    if msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                        link.too_big = _refused_frame(link)
                    break
                elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    link.dropped = link.lost is None   # no close frame, and not our close
                    break
        finally:
            link.lose(_closed(link, ws))

    def _on_message(self, link: _Link, data: str | bytes) -> None:
        try:
            reply: Any = reply_json(data)
        except orjson.JSONDecodeError:
            self.on_unreadable()
            # The upstream, or a proxy before it, may send thousands: a line a minute.
            log_limited(log, logging.WARNING, f"not-json:{self.name}",
                        "%s sent a reply that is not JSON; ignored", self.name)
            return
        reported = reply.get("reportedIds") if isinstance(reply, dict) else None
        if isinstance(reported, list):
            plain = ids_only(reported)
            acked = self._acked(link, reported, plain)
            if acked:
                link.notify()
            # Only a list of ids is an answer (as over HTTP): counted as one, a reportedIds
            # of objects, or null, weighed the frame's every event as left out, and gave
            # them up. It answers up to the last frame whose events it acknowledges (one
            # frame's acks split over several replies count once: each counted as the next
            # frame's answer, a later frame unanswered was taken for one left out); one
            # that acknowledges none (`[]`: a heartbeat's, a frame left out whole), the next.
            if plain:
                link.replies = _answered(link) if acked else link.replies + 1
                return
        # Not an ack: an error of the upstream's own, or news an old module would read
        # (latestVersion). Ignored, as before, but shown: a line a minute, and in the
        # error of a frame that then goes unanswered.
        link.said = excerpt(data if isinstance(data, bytes) else data.encode(), 200)
        # Only one that speaks of a frame (an error, reportedIds gone wrong) may be a frame's
        # answer: news answers none. Counted as one that may have, it let a stale id alone in
        # a message be taken for a later frame's answer (_acked): that event was deleted
        # unstored.
        if not isinstance(reply, dict) or "reportedIds" in reply or "error" in reply:
            # With the count in step, it answers the next frame: none of events when that is
            # a heartbeat's (or none is sent), so none may be skipped for it (a stale id alone
            # in a message was taken for a later frame's answer). The count stays: were it an
            # answer to the frame after an unanswered heartbeat, that frame is taken for one
            # unanswered (sent again), not weighed.
            if link.no_answers or link.replies + 1 in link.waiting:
                link.no_answers += 1
        log_limited(log, logging.INFO, f"not-an-ack:{self.name}",
                    "%s sent a reply without reportedIds, or with some that are not ids: %s",
                    self.name, link.said)

    def _acked(self, link: _Link, reported: list[Any], plain: bool) -> bool:
        """Take the events a reply on ``link`` acknowledges (whether any) out of
        ``in_flight``, into ``link.whole`` or ``link.acked``: of events whose frame went out
        on it whole and waits for its acks. Not one prepared and not yet sent whole (being
        written, or its write failed: ``going``), which the upstream has not seen,
        whatever the reply names: its id may be a repeat, for an earlier
        event (one dict of ids, and the frames checked by seq, cost a dict insert and pop
        less an event than a dict of ids sent per link)."""
        in_flight = self.in_flight
        n, frame = _next_frame(link)
        if plain and frame is not None and n != link.going and len(reported) == len(frame):
            # The usual reply: the next frame's every id, in its order.
            before = len(in_flight)
            popped = list(map(in_flight.pop, reported, repeat(None)))
            if before - len(in_flight) == len(popped) and tuple(popped) == frame:
                link.whole.add(n)
                link.no_answers = 0   # the count is in step
                return True
            in_flight.update((ack_id, seq) for ack_id, seq in zip(reported, popped)
                             if seq is not None)   # put back, and weighed one by one
        # Nor one of a frame after the one this reply answers (frames are answered in order:
        # the first not yet answered, else a late part of an earlier one's): an id of a later
        # frame it names is an earlier event's, answered again (a stale id, which modules'
        # reused ids make another event's), and that frame may never be stored. The one it
        # answers is the first unanswered one it names an event of, not the first unanswered
        # by the count: a reply that is no answer ({"error": ...}) is not counted, and the
        # answers of the frames after it were all taken for its, and those frames, stored,
        # were sent again. Only as many frames past the count's as such replies came may be
        # skipped: else a stale id alone in a message (an answer sent an id a message)
        # was taken for a later frame's answer, and its event deleted unstored.
        last = link.replies
        if frame is not None:
            named = {in_flight.get(ack_id) for ack_id in reported
                     if not isinstance(ack_id, (dict, list, bool))}
            ahead = [m for m in link.waiting if m >= n and m != link.going]
            ahead = ahead[:1 + link.no_answers]
            last = next((m for m in ahead if not named.isdisjoint(link.waiting[m])), n)
        here = set().union(*(seqs for m, seqs in link.waiting.items()
                             if m <= last and m != link.going))
        sent = {ack_id: seq for ack_id, seq in in_flight.items() if seq in here}
        acked = match(sent, reported, in_flight, plain)
        link.acked.update(acked)
        if acked and frame is not None and last != n:
            # The frames skipped: answered by replies that were no answer.
            skipped = ahead[:ahead.index(last)]
            link.no_answers -= len(skipped)
            link.unanswered.update(skipped)
        return bool(acked)

    async def _heartbeats(self, link: _Link, ws: aiohttp.ClientWebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        frame = orjson.dumps({"data": [{"type": "heartbeat", "machineId": self.machine_id}]})
        while not ws.closed:
            idle = loop.time() - self._last_sent
            if idle >= self.heartbeat_s:
                with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
                    link.frames += 1
                    await link.send(frame, self.cfg.timeout_s)
                self._last_sent = loop.time()
                idle = 0
            await asyncio.sleep(self.heartbeat_s - idle)

    async def close(self) -> None:
        """End the connection; the next send opens a new one, and a new set of ids."""
        link, self._link = self._link, None
        if link is not None:
            await link.close()
        self.in_flight = {}


async def _send_text(ws: aiohttp.ClientWebSocketResponse, frame: bytes) -> None:
    """A text frame from UTF-8 bytes, without the decode/encode round trip of send_str."""
    send_frame = getattr(ws, "send_frame", None)  # aiohttp >= 3.11
    if send_frame is not None:
        await send_frame(frame, aiohttp.WSMsgType.TEXT)
    else:
        await ws.send_str(frame.decode())


def _closed(link: _Link, ws: aiohttp.ClientWebSocketResponse) -> str:
    """Why a closed link is lost, with the close code and the upstream's reason: 1008 (a key
    it refuses), 1009 (a frame over its limit: the forwarder sends smaller ones) or a code of
    its own say what a restart's 1001 does not. Closed before a frame went out, the upstream
    refused the connection itself: a drop must not hide that."""
    code = ws.close_code
    # A close frame's reason is at most 123 bytes; anything longer is not one.
    reason = " ".join(link.close_reason.split())[:_REASON_SHOWN]
    how = f"close code {code}" + (f": {reason}" if reason else "") \
        + (" (too big: a frame over its size limit)" if code == 1009 else "")
    if link.carried:
        return f"{LOST} ({how})" if code is not None else LOST
    return f"the upstream closed the connection right after the handshake ({how})"


def _cut_short(link: _Link, mine: int, seqs: Sequence[int]) -> None:
    """A send of frame ``mine`` (``seqs``) that ends by raising: a stop's cancel (passed on
    even once the reply has come: see ``_Link.changed``), or a bug. Acknowledged
    whole, its seqs go to ``acked``, where ``acknowledged`` finds them once the frame no
    longer waits (else they were sent again after the restart). Else its events go again,
    and nothing sent later may reach the upstream first: the link is failed, as for any
    batch not wholly acknowledged."""
    if mine in link.whole:
        link.acked.update(seqs)
    elif mine:
        link.failed = True
        link.lose(CUT_SHORT)


def _settled(link: _Link, mine: int) -> bool:
    """The send of frame ``mine`` has ended, whichever way: it no longer counts on
    ``link`` (a link lost with a send counted is never replaced), nor waits for acks.
    Whether a reply acknowledged it whole."""
    link.sending -= 1
    link.waiting.pop(mine, None)
    link.sizes.pop(mine, None)
    link.unanswered.discard(mine)
    whole = mine in link.whole
    link.whole.discard(mine)
    return whole


def _refused_frame(link: _Link) -> int | None:
    """The frame a 1009 from the upstream is taken to refuse: the longest of those it had
    not wholly acknowledged (the first of them, if several are as long). Not the first
    of them: an upstream that acks a frame once its events are stored reads the next
    meanwhile, and closes for it at once; the first, waiting for its ack, was blamed,
    and its event, were it alone, given up as too big however short. The one refused is
    longer than any the upstream read before it, so the longest is at least as long:
    refused too, given up alone, or halved from, lest a frame that long go again."""
    unacked = [n for n, seqs in link.waiting.items() if not link.all_acked(n, seqs)]
    return max(unacked, key=lambda n: (link.sizes.get(n, 0), -n), default=None)


def _next_frame(link: _Link) -> tuple[int, Sequence[int] | None]:
    """The number and seqs of the first frame sent on ``link`` that no reply has answered
    yet; (0, None): none."""
    for n, seqs in link.waiting.items():
        if n > link.replies:
            return n, seqs
    return 0, None


def _answered(link: _Link) -> int:
    """The last frame of ``link`` an acknowledgement has answered: the newest waiting one
    with an event acknowledged (``acked`` holds this reply's too: the frames of earlier
    ones are counted already), or ``replies`` as it was. Frames, not events, are scanned:
    a seq-to-frame map cost ~0.07 us an event sent, a few per cent of a drain."""
    for n in reversed(link.waiting):
        if n <= link.replies:
            break
        if n in link.whole or not link.acked.isdisjoint(link.waiting[n]):
            return n
    return link.replies


def _handshake_refused(exc: aiohttp.WSServerHandshakeError,
                       via: Proxy | None = None) -> tuple[str, float | None]:
    """Why, and the Retry-After to honour. Not the exception's text: it holds the URL, and so
    the key in its path. As the HTTP uplinks, a wait counts whatever the status: a refused
    handshake is no verdict on any event (a 429, a 5xx, a quota worded as a 403, a page)."""
    headers: Mapping[str, str] = exc.headers or {}
    if via is not None and exc.status == 407:
        # Only a proxy answers 407: a ws:// handshake goes to it whole (no CONNECT).
        target = exc.request_info.url.host_port_subcomponent or "the upstream"
        return (f"{via.shown}: " + proxy_refused(407, "Proxy Authentication Required",
                                                  f"the handshake with {target}",
                                                  via.user is not None),
                retry_after(headers.get("Retry-After"), date=headers.get("Date")))
    page = html_instead_of_reply(exc.status, media_type(headers.get("Content-Type")))
    wait = retry_after(headers.get("Retry-After"), date=headers.get("Date"))
    check = to_check(exc.status)
    if exc.status == 400 and exc.request_info.url.scheme == "ws":
        # A valid upgrade refused as malformed: plain HTTP read by a TLS port, as Go's
        # servers answer it (with a body that says so, shown below).
        check = "a port that speaks HTTPS, not HTTP? check the upstream's url: wss://"
    hint = "" if page else f" ({check})" if check else ""
    # What the reply said, redacted as the HTTP uplinks' (HttpReply.said): read by the
    # session's read_refused_handshakes, as aiohttp's own error has none of it.
    said = excerpt(exc.body, 200).strip() if isinstance(exc, HandshakeRefused) else ""
    what = page or (f"HTTP {exc.status}: {said}" if said else f"HTTP {exc.status} ({exc.message})")
    return f"websocket handshake refused: {what}{hint}", wait
