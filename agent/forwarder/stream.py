"""Per-key forwarding loops: batch on size or time, back off with jitter, ack, dead-letter.

One StreamForwarder runs for each (upstream, local key) pair, so FIFO per (key,
lane) is natural: each read takes the high lane's rows first, then the normal
lane's (agent/families/lanes.py; after NORMAL_SHARE high batches in a row with normal
events waiting, one read takes a batch of the normal lane alone), each lane in seq
order from its own cursor, and
only the lanes the transmit profile lets go (``lanes``; a ``max_hold_h`` release adds
the others up to a seq, ``until``). Rows are leased only in
memory (the cursors plus the uplink's in-flight set): after any failure every
in-flight batch settles, the uplink is closed (a new connection is opened only
now, so no later batch can overtake an earlier unacknowledged one), the cursors go
back to the start of the key's lanes, and all unacknowledged rows are sent again
with the same ids. Run by
supervisor.py, a loop does not sleep out a backoff: it ends, and the supervisor starts
the key's next loop (fresh uplink, cursor at the start) when the time comes.

Every wait in the loop is on one event, ``wake``, cleared at the start of each
step before any state is read: whatever happens after that (a batch finishing
or failing, new data, a flush, a stop) sets it, so no wait can miss it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.clock import CLOCK, until_due
from agent.families.errors import shown
from agent.families.lanes import HIGH, LANES, NORMAL
from agent.forwarder.backoff import BACKOFF, Backoff
from agent.forwarder.slots import Slots
from agent.forwarder.state import NEXT_TRY, UpstreamState
from agent.forwarder.timing import LOOP_TIMING, Timing
from agent.logs import log_limited, redact
from agent.metrics import Metrics
from agent.settings import UpstreamConfig
from agent.spool import Spool
from agent.spool.types import Queued, Row, SpoolFull, Stream, joined
from agent.uplinks.base import REQUEST_TIMEOUT, Acked, Refused, Retry, SendResult, Uplink
from agent.uplinks.prepare import Prepared

log = logging.getLogger("outpost.forwarder")

FETCH_FACTOR = 4  # rows fetched per spool read, in batches
# With one batch in flight (an HTTP uplink), a read ahead fetches this many batches' events
# (in one batch's bytes, what its slot may hold): the one that goes next, and the rest kept
# (``_spare``) for the read ahead after it, so that only every other turn waits on the
# reader thread.
AHEAD_BATCHES = 2
# An event the upstream answers for but leaves out is given up to dead letters once the
# answers that left it out weigh OMITTED_LIMIT: the upstream will not take it, and it
# would hold its key forever. An answer that passed it over (acknowledged a later event
# of its batch) weighs PASSED_OVER; one for it alone, 1 (an upstream in a brief fault
# answers so too); an unacknowledged tail (an upstream that stores only a prefix never
# reached it), nothing.
OMITTED_LIMIT = 6
PASSED_OVER = 2
# How long a stop (a shutdown, a reload, a hold) waits for the batches in flight.
STOP_GRACE_S = 5.0
OMITTED_KEPT = 10_000  # counts kept per key; past it (seqs gone another way) they restart
ACK_GROUP = 20  # batches' worth of acked rows deleted per spool call while rows keep coming
# The high lane goes first, but not for ever: after this many high batches in a row with
# normal events waiting (an app in an error loop), one batch of the normal lane goes.
NORMAL_SHARE = 4
# A batch limit set by a 413 with a Retry-After (too large for now, RFC 9110) doubles once
# its upstream has answered the smaller batches this long with no such refusal: the load
# it was shedding has passed. A 1009's (a websocket's frame cap) stays.
LIMIT_EASE_S = 60.0
# A read of one key's queue: spool.fetch's arguments (stream, cursors, limit, lanes,
# max_bytes, until); and what a read ahead got: the rows, and their batch if prepared.
_Read = tuple[int, tuple[int, ...], int, tuple[int, ...], int, "tuple[int | None, ...] | None"]
_Ready = tuple[Queued, "Prepared | None"]


class _Ahead(NamedTuple):
    """A read ahead: what it asked the spool, the key's high events stored by then
    (Stream.high_in), the read."""

    read: _Read
    high: int
    rows: asyncio.Future[_Ready]


# Told of each upstream ack: (upstream, key, the batch's rows, the seqs acked). The live
# event view (ops/tail.py); cheap by contract: one truth test when nobody watches. What it
# returns shows the ack, called once the spool has recorded it: an ack not recorded is
# sent again and acknowledged again, and was shown at each.
Shown = Callable[[], None]
AckHook = Callable[[str, str, Sequence[Row], Sequence[int]], Shown | None]


def ignore_acks(upstream: str, key: str, rows: Sequence[Row],
                seqs: Sequence[int]) -> Shown | None:
    return None


@dataclass
class LeftOut:
    """Events of one key the upstream answered for but left out: what its answers weigh
    (see OMITTED_LIMIT), and the heads of batches left out whole, to be sent alone. The
    supervisor keeps it across the key's loops."""

    weights: dict[int, int] = field(default_factory=dict)
    alone: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.weights)

    def forget(self, seq: int) -> None:
        self.weights.pop(seq, None)
        self.alone.discard(seq)


@dataclass(frozen=True)
class Release:
    """How a supervised loop ends rather than hold a task, an uplink and a connection
    (any local app can invent keys): once its queue has stayed empty ``idle_s``, and,
    instead of sleeping out a backoff, by handing ``park`` its (delay, attempt, told):
    told if the delay is the upstream's own Retry-After."""

    idle_s: float
    park: Callable[[float, int, bool], None]
    # Other keys wait for a loop (supervisor.MAX_LOOPS): end as soon as the queue is empty.
    crowded: Callable[[], bool] = lambda: False


class StreamForwarder:
    """Forwards one key's queue to one upstream. Supervised (supervisor.py), it ends as
    ``release`` says; without one it runs until stopped, sleeping out its backoffs."""

    def __init__(self, cfg: UpstreamConfig, stream: Stream, spool: Spool, uplink: Uplink,
                 state: UpstreamState, metrics: Metrics, window: int, *,
                 release: Release | None = None, attempt: int = 0,
                 lanes: tuple[int, ...] = LANES,
                 timing: Timing = LOOP_TIMING, backoff: Backoff = BACKOFF,
                 on_acked: AckHook = ignore_acks, omitted: LeftOut | None = None,
                 slots: Slots | None = None, grace_s: float = STOP_GRACE_S) -> None:
        self.cfg = cfg
        self.grace_s = grace_s   # a stop's wait for the batches in flight
        # Set by a stop that waits only grace_s for them (a shutdown, a reload); a hold's
        # stop (stop(hurry=False)) lets them finish, each within timeout_s.
        self._hurry = asyncio.Event()
        self.cut_short = 0       # sends a stop cancelled after that wait
        # The upstream's batches in flight, shared by its keys' loops (slots.py).
        self.slots = Slots() if slots is None else slots
        self._granted = 0   # slots taken, not yet given to a batch
        self._slot_wait: asyncio.Future[None] | None = None
        # What the upstream's answers left out (LeftOut), kept across the key's loops.
        self.omitted = LeftOut() if omitted is None else omitted
        self.on_acked = on_acked
        self.stream = stream
        self.spool = spool
        self.uplink = uplink
        self.state = state
        self.metrics = metrics
        self.window = window
        self.wake = asyncio.Event()       # anything the loop may be waiting for happened
        self.interrupt = asyncio.Event()  # a flush or stop: also cuts a backoff short
        self.stopping = False
        self.flush_now = False
        self.lanes: tuple[int, ...] = lanes   # the lanes it may send (sync/monitor.py)
        # A max_hold_h release (supervisor.py): per lane, the last seq it lets go; None for
        # the profile's own lanes. Once sent, the loop goes back to those lanes alone.
        self.until: tuple[int | None, ...] | None = None
        # Per lane: the last seq sent; leased in the spool while the loop runs (changed in
        # place: the spool reads this list), so the size cap and expiry leave what is in
        # flight (spool/leases.py).
        self._cursors = [0] * len(LANES)
        self._high_run = 0   # high batches sent in a row with normal events waiting
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0   # rows of the batches in _tasks
        # The next batch's read, started while the window was full (_read_ahead). It holds
        # a slot of its own (_ahead_slot) until the loop reads next: then the slot is that
        # read's, so that the loop never holds one while it waits for another.
        self._ahead: _Ahead | None = None
        self._ahead_slot = False
        # Rows read beyond the batch just sent, a whole batch or more: the next step's read
        # ahead, if it is the step's next move, starts from them; any other move drops them.
        self._spare: Queued | None = None
        self._acking: set[asyncio.Task[None]] = set()  # spool deletes of upstream-acked rows
        # Upstream-acked rows not yet handed to spool.ack, as each ack gave them, and how
        # many: a spliced batch's are a range, kept whole down to the spool's settle.
        self._held: list[Sequence[int]] = []
        self._held_count = 0
        self._held_delivered = 0    # of them, those still queued (_apply): counted once saved
        self._held_shown: list[Shown] = []   # their live view's (AckHook): shown once saved
        self._failed: Retry | None = None
        # The uplink's connection ended with a batch that then completed by giving events
        # up (see _left_out): reopened before the next send, with no backoff.
        self._reopen = False
        # The upstream's batches may be larger now (_faster): a new loop sends them so.
        self._resized = False
        # A batch was refused as too big with no wait asked (_too_big): the failure it
        # ends the loop with is the protocol working, and a new loop sends smaller ones.
        self._halved = False
        self._connecting: asyncio.Future[Retry | None] | None = None  # see _connect
        self._crash: BaseException | None = None  # unexpected: raised to the supervisor
        self.attempt = attempt  # failures in a row: the next backoff's step
        self.release = release
        self.timing = timing
        self.backoff = backoff
        self.released = False
        self.yielded = False   # released with events queued: its turn passed to a key in line
        self._empty_since: float | None = None  # loop time the queue was first seen empty
        self._recounted = False   # its key's queue counted again since it last read rows
        self._sending = False   # counted in the upstream's state.sending (_mark_sending)
        self._turn_from: float | None = None   # loop time it began this turn (run)

    async def run(self) -> None:
        """One life of the loop. Raises what it did not expect; the supervisor
        counts it and calls ``run`` again, with a fresh uplink, after a backoff."""
        self._rewind()
        self._failed, self._crash, self._halved = None, None, False
        self._turn_from = asyncio.get_running_loop().time()
        self.uplink.on_crash = self._crashed
        self.uplink.on_unreadable = self.state.unreadable_reply
        self.spool.leases.hold(self.stream.id, self._cursors)
        try:
            while not self.stopping and not self.released:
                await self._step()
        finally:
            self._leave_slots()   # first: whatever the settle raises, none is kept
            try:
                if self.stopping:
                    await self._finish_sends()
                await self._settle(timeout=self.grace_s)
            finally:   # its batches answered or cut short (or the settle raised): done
                if not self.yielded:   # its events go on in its successor: sending still
                    self._mark_sending(False)   # (until the supervisor's ``ended``)
                self.spool.leases.free(self.stream.id, self._cursors)
                # Whatever the settle raised (a cut send's ack hook, a bug): a websocket
                # left open lived on beside the next loop's, heartbeating.
                await self.uplink.close()
            if self.stopping and self._failed is not None and self.release is not None \
                    and not self.released:
                # Stopped (a hold) before backing off from a failure: the key still waits
                # out its backoff, a Retry-After included, before its next loop sends.
                self.released = True
                told = self._failed.retry_after is not None
                self.release.park(self._back_off(), self.attempt, told)
        if self._crash is not None:  # raised by a batch that settled as the loop ended
            raise self._crash

    async def _step(self) -> None:
        self.wake.clear()      # before reading any state: see the module docstring
        self.interrupt.clear()
        spare, self._spare = self._spare, None
        if self._crash is not None:
            raise self._crash
        if self._failed is not None:
            self._drop_ahead()   # the cursors go back: what it read goes again, in turn
            await self._settle()
            if self._crash is not None:  # raised by a batch that was settling
                raise self._crash
            if self._halved and self._failed.retry_after is None and self.release is not None:
                # Not backed off from, counted or probed (a 1009 at each halving did all
                # three): the successor starts at once, with the smaller batches (_sized).
                self._failed, self._halved = None, False
                self.released = self.yielded = True
                return
            told = self._failed is not None and self._failed.retry_after is not None
            delay = self._back_off()
            self._mark_sending(False)   # status shows the backoff
            if self.release is not None:
                self.released = True
                self.release.park(delay, self.attempt, told)
                return
            await self.pause(delay)
            # Only now, with nothing in flight, may a new connection start.
            self._reopen = False
            await self.uplink.close()
            self._rewind()
            return
        self._leave_lanes()
        if self._reopen and not self._tasks:
            # As after a failure: nothing in flight, so nothing sent later can overtake.
            self._reopen = False
            await self.uplink.close()
        if (self._turn_over() or self._resized) and self.queued():
            # Acks held for a grouped delete go now: a released loop's successor may start
            # before this one has ended, and would send their rows again.
            self._ack_held()
            if self._tasks or self._acking:
                await self._idle(None)   # nothing more is read; each answer wakes it
            else:
                self.released = self.yielded = True
            return
        if len(self._tasks) >= self.window:
            self._read_ahead(spare)
            await self._idle(None)
            return
        queued = self.queued()
        if not queued:   # nothing to read (rows in flight count as queued)
            await self._after_read(Queued([]))
            return
        # Only what the window has room for: with one batch in flight (segment-http), rows
        # read beyond it were built, dropped and read again, four times over.
        # And no more slots than the queue has batches for, in events or bytes (rows in
        # flight count too; bytes of every lane: at most a slot too many, given back).
        cfg = self.cfg
        free = min(FETCH_FACTOR, self.window - len(self._tasks),
                   max(-(-queued // cfg.batch_max_events),
                       -(-self.stream.bytes // cfg.batch_bytes)))
        if self._ahead_slot:
            self._ahead_slot, self._granted = False, self._granted + 1
        if not self._hold_slots(free):
            self._ack_held()
            await self._idle(None)   # a slot given back wakes it
            return
        try:
            await self._read(min(free, self._granted))
        finally:
            self._give_back()

    def _next_read(self, batches: int) -> tuple[_Read, bool]:
        """What a read of up to ``batches`` batches asks the spool, and whether it is the
        normal lane's share (see NORMAL_SHARE)."""
        share = self._high_run >= NORMAL_SHARE and NORMAL in self.lanes
        if share:
            batches = 1
        elif self._high_run:
            # Normal events wait (_count_high): a read of several high batches would pass
            # the share by up to FETCH_FACTOR (the normal batch came after 4 to 7 high ones).
            batches = min(batches, NORMAL_SHARE - self._high_run)
        cfg = self.cfg
        return (self.stream.id, tuple(self._cursors), cfg.batch_max_events * batches,
                (NORMAL,) if share else self.lanes, cfg.batch_bytes * batches,
                self.until), share

    async def _read(self, batches: int) -> None:
        """Read and send up to ``batches`` batches of the key's queue (one slot each)."""
        gate = self._gate()
        read, share = self._next_read(batches)
        if share:
            self._high_run = 0
        high = self.stream.high_in   # what _rows_ahead checks the read ahead's rows by
        rows, batch = await self._rows_ahead(read) or (await self.spool.fetch(*read), None)
        if self._failed is not None or self._crash is not None:
            return  # a batch failed during the read: nothing new goes out before the resend
        if self._gate() != gate or self.stopping:
            # The lanes or a release's bounds changed, or a hold stopped the loop, during
            # the read: what it read may not go out (an HTTP uplink has no connection to
            # open, whose check stops it).
            return
        if share and not (rows and (self._full(rows) or self._due(rows))):
            return  # none of it to send yet (in flight, or not due): the high lane goes on
        left = await self._after_read(rows, batch)
        if left is not None and self.window == 1 and self._full(left) \
                and self.stream.high_in == high:
            # The next read (the read ahead, with no await between) asks for the rows after
            # those sent: these, if from the same lanes and bound (a share of the normal
            # lane is read alone), and if no high event came since they were read (while
            # the send waited for a connect or a commit that may drop: it goes first; one
            # coming later drops the read ahead: _rows_ahead).
            after, _ = self._next_read(1)
            if (after[3], after[5]) == (read[3], read[5]):
                self._spare = left

    async def _after_read(self, rows: Queued, ready: Prepared | None = None) -> Queued | None:
        """Send what ``rows`` hold, as the window allows; ``ready``: their first batch,
        prepared ahead (_fetch_ahead). Returns the rows left when the window filled."""
        gate = self._gate()
        if not rows:
            self._leave_slots()   # before any wait: an idle loop holds no slot, waits for none
            self._ack_held()
            self._quiet()
            if not self._tasks:  # everything sent and answered: a flush is complete
                self.flush_now = False
                if any(self._cursors) and not self._acking and self.queued():
                    # Rows behind the cursors are still queued: an ack's delete did not
                    # commit (a locked or full disk). Send them again.
                    self._rewind()
                    return None
                if self.until is None and not self._acking and self.queued() \
                        and not self._recounted:
                    # Read from the start of its lanes, and none of the events its key's
                    # count says are queued is there: damage garbled the count, which would
                    # never come back to 0 (once per empty stretch: a drop may have been
                    # read before its commit was counted).
                    self._recounted = True
                    await self.spool.recount(self.stream)
                    return None
                if self.until is not None and not self._acking:
                    self._released_sent()
                    return None
                if self.release is not None:
                    await self._release_when_idle(
                        0.0 if self.release.crowded() else self.release.idle_s)
                    return None
            await self._idle(None)
            return None
        self._empty_since = None
        self._recounted = False
        if rows[0].seq in self.omitted.alone:
            rows, ready = rows[:1], None   # the head of a batch left out whole: judged alone
        elif not self._full(rows) and not self._due(rows):
            self._leave_slots()
            self._ack_held()
            self._quiet()
            await self._idle(until_due(_oldest(rows), self.cfg.flush_interval_s))
            return None
        self._mark_sending(True)   # a batch goes now (after a connect, maybe)
        if not self._tasks and (opening := self.uplink.connecting()) is not None:
            # A connection may open now: open it before preparing, or an upstream that
            # is down costs every retry its batch (Segment events bound to nucleus-ws: a
            # mapping each) before the connect fails. One slot is enough for a handshake
            # that may hang for timeout_s.
            if self._granted > 1:
                self.slots.give(self._granted - 1)
                self._granted = 1
            failed = await self._connect(opening)
            if failed is not None:
                self._failed = failed
                return None
            if self._crash is not None or self.stopping or self._gate() != gate:
                return None  # changed while it connected: read again (or end) before sending
        if (dropping := self.spool.dropping) is not None:
            # A commit or expiry runs that may drop records, and it took the leases before
            # these rows were read: leased now, they are left by any that starts from here;
            # sent without waiting for that one, they could be dropped in flight.
            before = list(self._cursors)
            self._advance(rows)
            try:
                await asyncio.wait((dropping,))
            finally:
                self._cursors[:] = before
            if self._failed is not None or self._crash is not None or self.stopping \
                    or self._gate() != gate:
                return None
        if self.spool.dropped_since(rows):
            # A commit ran since the read (while it connected, waited for a drop, or after a
            # read ahead) and dropped some of them: sent, they were delivered and counted
            # dropped too.
            return None  # read again
        batch = self.uplink.prepare(rows) if ready is None else ready
        if not batch.rows:  # the first row's id is still in flight: wait for its ack
            if not self._tasks:  # ...but nothing is: waiting would be forever
                raise RuntimeError(f"uplink {self.uplink.name} took no row, none in flight")
            self._leave_slots()
            await self._idle(None)
            return None
        # One read feeds as many batches as the window allows: reading FETCH_FACTOR
        # batches' worth of rows per batch sent kept the reader thread (building rows
        # it then dropped) the drain's bottleneck.
        while batch.rows:
            self._advance(batch.rows)
            self._count_high(batch.rows)
            self._granted -= 1
            self._in_flight += len(batch.rows)
            self._track(self._tasks, self._deliver(batch)).add_done_callback(
                functools.partial(self._answered, len(batch.rows)))
            rows = rows[len(batch.rows):]
            if len(self._tasks) >= self.window:
                return rows or None
            if not rows or not self._granted or (not self._full(rows) and not self._due(rows)):
                return None
            batch = self.uplink.prepare(rows)
        return None

    def _mark_sending(self, sending: bool) -> None:
        """Count this loop in its upstream's ``sending`` (status shows the upstream
        sending while any of its loops is), or no longer. A loop that sends again is past
        its upstream's backoff or restart."""
        if sending == self._sending:
            return
        self._sending = sending
        self.state.sending += 1 if sending else -1
        if sending:
            self.state.state = "idle"

    def resume(self) -> None:
        """What it has queued goes at once (its key out of its backoff or let go by the
        profile, its turn in line come, its last loop handed over, a restart after a
        crash: supervisor.py). Counted sending from now, or its upstream showed "idle"
        for the loop turns before its first read, which uncounts it if nothing goes
        (_quiet)."""
        if self.queued() and not self.stopping and not self.released:
            self._mark_sending(True)

    def ended(self) -> None:
        """Its task has ended, whichever way, and its key's next loop, if any, is started
        (supervisor.py): it is no longer counted sending."""
        self._mark_sending(False)

    def _quiet(self) -> None:
        """Nothing due to go: once its batches are answered and their acks committed (each
        of which wakes the loop), it is no longer sending."""
        if not self._tasks and not self._acking:
            self._mark_sending(False)

    def _read_ahead(self, spare: Queued | None) -> None:
        """With its one batch in flight, start reading the batch that goes next, so that it
        is ready when the answer comes: an HTTP uplink sends one batch at a time, and its
        drain otherwise waited out each read and prepare in series with the upstream (a
        pipelined uplink has others in flight meanwhile). Only from a clean state, when a
        whole batch waits behind the one in flight (or a flush), and with a free slot: the
        rows it holds count as a batch. ``spare``: the rows the last read left, to start
        from instead of the spool."""
        if self.window > 1 or self._ahead is not None or self._failed is not None \
                or self._reopen or self.stopping or self._crash is not None:
            return
        beyond = self.queued() - self._in_flight - self._held_count
        if beyond < self.cfg.batch_max_events and not (self.flush_now and beyond > 0):
            return
        if not self.slots.take(1):
            return
        read, _ = self._next_read(1)
        self._ahead = _Ahead(read, self.stream.high_in,
                             asyncio.ensure_future(self._fetch_ahead(read, spare)))
        self._ahead_slot = True

    async def _fetch_ahead(self, read: _Read, spare: Queued | None) -> _Ready:
        """The read ahead (``spare``, or AHEAD_BATCHES batches' events fetched), and the
        batch prepared from it while the one before is in flight, if the uplink allows (one
        taken alone is prepared when it goes)."""
        if spare is not None:
            rows = spare
        else:
            stream, cursors, limit, lanes, max_bytes, until = read
            rows = await self.spool.fetch(stream, cursors, limit * AHEAD_BATCHES, lanes,
                                          max_bytes, until)
        if not rows or not self.uplink.prepares_ahead or rows[0].seq in self.omitted.alone:
            return rows, None
        return rows, self.uplink.prepare(rows)

    async def _rows_ahead(self, read: _Read) -> _Ready | None:
        """The rows read ahead (and their batch, if prepared), if that read asked what
        ``read`` asks now (nothing sent, resent or changed since: the cursors, lanes and
        bounds are the same) and no high event came since (it goes first), else None.
        Rows beyond the cursors are touched by nothing but this loop's own sends, so the
        same question has the same answer, but for events that came after it."""
        ahead = self._ahead
        if ahead is None:
            return None
        # Not the high lane's depth: a high event of the batch in flight acked or
        # dead-lettered meanwhile lowers it as much as a new one raises it.
        if ahead.read != read or self.stream.high_in != ahead.high:
            self._drop_ahead()
            return None
        self._ahead = None
        try:
            ready = await ahead.rows
        except Exception:   # read again: a failure is the fresh read's to raise
            return None
        return ready if ready[0] else None   # empty: read again, something may have come

    def _drop_ahead(self) -> None:
        ahead, self._ahead, self._spare = self._ahead, None, None
        if ahead is not None:
            ahead.rows.cancel()
            ahead.rows.add_done_callback(_retrieved)
        if self._ahead_slot:
            self._ahead_slot = False
            self.slots.give()

    def _answered(self, rows: int, _: asyncio.Task[None]) -> None:
        self._in_flight -= rows
        self.slots.give()

    def _count_high(self, sent: Sequence[Row]) -> None:
        """Count a batch of the high lane alone sent while normal events wait."""
        if sent[-1].lane == HIGH and NORMAL in self.lanes and self.stream.queued((NORMAL,)):
            self._high_run += 1
        else:
            self._high_run = 0

    def _released_sent(self) -> None:
        """What a max_hold_h release let go is sent and answered: back to the profile's
        lanes, and events that came after it are held as the profile says (hold: the
        loop ends)."""
        assert self.until is not None
        self.lanes = tuple(lane for lane in self.lanes if self.until[lane] is None)
        self.until = None
        if not self.lanes:
            self.stop()

    def _full(self, rows: Queued) -> bool:
        """Whether ``rows`` fill a batch: in events, or in bytes (the stored bodies: an
        estimate of what the uplink sends)."""
        cfg = self.cfg
        return len(rows) >= cfg.batch_max_events or rows.nbytes() >= cfg.batch_bytes

    @property
    def read_ahead(self) -> bool:
        """Whether the batch that goes next is read (_read_ahead), waiting for a place."""
        return self._ahead is not None and self._ahead.rows.done()

    @property
    def batches_in_flight(self) -> int:
        """Batches sent and not yet answered."""
        return len(self._tasks)

    @property
    def waiting_for_slot(self) -> bool:
        return self._slot_wait is not None and not self._slot_wait.done()

    def _hold_slots(self, want: int) -> bool:
        """Hold slots for up to ``want`` batches; False while waiting for the first (its
        arrival wakes the loop)."""
        wait = self._slot_wait
        if wait is not None:
            if not wait.done():
                return False
            self._slot_wait = None
            self._granted += 1
        if self._granted < want:
            self._granted += self.slots.take(want - self._granted)
        if self._granted:
            return True
        self._slot_wait = wait = self.slots.wait()
        wait.add_done_callback(lambda _: self.wake.set())
        return False

    def _give_back(self) -> None:
        """Slots held but not given to a batch go back (an idle loop holds none)."""
        if self._granted:
            self.slots.give(self._granted)
            self._granted = 0

    def _leave_slots(self) -> None:
        """The loop ends: stop waiting for a slot; one given meanwhile goes back."""
        wait, self._slot_wait = self._slot_wait, None
        if wait is not None and not wait.cancel():
            self._granted += 1   # already given: it is ours to give back
        self._give_back()
        self._drop_ahead()

    async def _connect(self, opening: Coroutine[Any, Any, Retry | None]) -> Retry | None:
        """The uplink's connect, as a task that a stop cancels: a handshake that hangs
        can take timeout_s, and a stop waits only a grace for the batches in flight."""
        task = self._connecting = asyncio.ensure_future(opening)
        try:
            await asyncio.wait((task,))
        finally:
            self._connecting = None
            task.cancel()   # done: a no-op; else this loop's own task was cancelled
        return None if task.cancelled() else task.result()

    def _track(self, tasks: set[asyncio.Task[None]],
               work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` as a task in ``tasks``; when it ends, wake the loop, and hand
        anything it raised to the loop, which raises it to the supervisor."""
        task = asyncio.create_task(work)
        tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            tasks.discard(t)
            exc = None if t.cancelled() else t.exception()
            if exc is not None:
                self._crashed(exc)
            self.wake.set()
        task.add_done_callback(done)
        return task

    def _crashed(self, exc: BaseException) -> None:
        """A bug in a delivery or in the uplink: the loop raises it at its next step."""
        if self._crash is None:
            self._crash = exc
        self.wake.set()

    def _rewind(self) -> None:
        """Send from the start of the key's lanes again (nothing is in flight)."""
        self._cursors[:] = [0] * len(LANES)

    def _leave_lanes(self) -> None:
        """Lanes the loop sends no more (a sync policy narrowed it) go back to their start
        once nothing is in flight, as after a failure: their cursors are leases
        (spool/leases.py), and the rest of a record partly sent before stayed out of the
        cap's and expiry's reach for as long as the loop ran."""
        if not self._tasks and not self._acking and not self._held:
            for lane in LANES:
                if lane not in self.lanes:
                    self._cursors[lane] = 0

    def _advance(self, sent: Sequence[Row]) -> None:
        """Move each lane's cursor to its last row in ``sent`` (high rows, then normal)."""
        last = sent[-1]
        self._cursors[last.lane] = last.seq
        if sent[0].lane != last.lane:   # the batch crosses from the high lane to the normal
            self._cursors[sent[0].lane] = next(
                r.seq for r in reversed(sent) if r.lane == sent[0].lane)

    def _gate(self) -> tuple[tuple[int, ...], tuple[int | None, ...] | None]:
        """What the loop may send now: its lanes, and a release's bounds (a regate can
        narrow those alone: a release under way goes on under a hold)."""
        return self.lanes, self.until

    def queued(self) -> int:
        """Events queued in the lanes this loop may send (the key's depth counters)."""
        return self.stream.queued(self.lanes)

    def _due(self, rows: Sequence[Row]) -> bool:
        # By the oldest row: a fresh high event at the front must not delay old normal ones.
        return self.flush_now or until_due(_oldest(rows), self.cfg.flush_interval_s) <= 0

    async def _idle(self, timeout: float | None) -> None:
        """Wait for new data, a finished batch, a flush or stop (or ``timeout``)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wake.wait(),
                                   max(timeout, 0.0) if timeout is not None else None)

    def _turn_over(self) -> bool:
        """Whether this loop gives its turn to the keys in line for a loop
        (supervisor.MAX_LOOPS), once what it has in flight is answered: after two flush
        intervals, so that keys that never empty their queue (a slow upstream) cannot keep
        the others out for good."""
        if self.release is None or not self.release.crowded():
            return False
        started = self._turn_from
        return started is not None and \
            asyncio.get_running_loop().time() - started >= 2 * self.release.idle_s

    async def _release_when_idle(self, idle_s: float) -> None:
        """Mark the loop released once its queue has stayed empty for ``idle_s``.

        The key's depth is updated by each commit before its apps are answered, and so
        before supervisor.py is told of new data: at 0, nothing is queued, however stale
        the last read. Decided without an await after that check, so supervisor.py sees
        ``released`` before any later data and starts a fresh loop for it. Wakes that
        bring no data (an ack's spool delete finishing) do not restart the count.
        """
        now = asyncio.get_running_loop().time()
        if self._empty_since is None:
            self._empty_since = now
        remaining = self._empty_since + idle_s - now
        if remaining > 0:
            await self._idle(remaining)
        elif self._acking:  # its completion wakes us
            await self._idle(None)
        elif self._crash is None and self.queued() == 0:
            self.released = True
        else:  # queued rows the spool cannot show now (a recovery): new data or a reopen wakes us
            await self._idle(None)

    async def _deliver(self, batch: Prepared) -> None:
        started = asyncio.get_running_loop().time()
        # No await before send: over a websocket, batches go out in the order they start.
        result: SendResult = await self._send(batch) if batch.seqs else Acked(())
        if self.state.slow_limit_bytes is not None and isinstance(result, Acked):
            self._faster(batch, asyncio.get_running_loop().time() - started)
        eases_at = self.state.frame_limit_eases_at
        if eases_at is not None and isinstance(result, Acked):
            self._easing(eases_at, batch)
        match result:
            case Refused(reason=reason):
                await self._apply(Acked(()), batch, batch.refused)
                dead = self.state.dead_lettered
                if await self._split(batch, result) == len(batch.seqs) and \
                        self.state.dead_lettered == dead:
                    # Refused together, taken apart, none refused alone: a proxy's body size
                    # limit, say, which every full batch will pay for until the limits agree.
                    log_limited(log, logging.WARNING, f"split:{self.cfg.name}",
                                "upstream %s refused %d events together (%s) but took them "
                                "in smaller batches: if this repeats, lower batch_max_bytes "
                                "or batch_max_events to what it takes", self.cfg.name,
                                len(batch.seqs), reason)
            case Acked() | Retry():
                await self._apply(result, batch, batch.refused)

    async def _send(self, batch: Prepared) -> SendResult:
        """The uplink's send of ``batch``, counted (``sent``: resends count again). A stop
        that cuts it short (``grace_s`` ran out) keeps what the upstream acknowledged of it
        meanwhile (a websocket acknowledges a frame's events as replies come): only the
        rest is sent again."""
        self.state.sent += len(batch.seqs)
        try:
            return await self.uplink.send(batch)
        except asyncio.CancelledError:
            self.cut_short += 1
            acked = self.uplink.acknowledged(batch)
            if acked:
                await self._apply(Acked(acked), batch)
            raise

    async def _split(self, batch: Prepared, refused: Refused) -> int:
        """Bisect a refused batch until the events that cause it are isolated; the events
        acknowledged. Events the spool dropped meanwhile (max_size_mb, max_age_days) are
        left out: the refused send did not deliver them, and a dropped event is not sent
        afterwards."""
        batch = self._still_queued(batch)
        if not batch.seqs:
            return 0
        if len(batch.seqs) == 1:
            # Given up; a wait it asked (a 413's Retry-After) is kept before the next send:
            # sent at once, the rest of a queue went to dead letters in a burst.
            wait, dead = refused.retry_after, ((batch.seqs[0], refused.reason),)
            await self._apply(Acked(()) if wait is None else
                              Retry(refused.reason, retry_after=wait), batch, dead)
            return 0
        taken = 0
        for half in batch.halves():
            part = self._still_queued(half)   # dropped while the other half was sent
            if not part.seqs:
                continue
            match await self._send(part):
                case Refused() as refusal:
                    taken += await self._split(part, refusal)
                case Acked() | Retry() as result:
                    taken += await self._apply(result, part)
            if self._failed is not None:
                break
        return taken

    def _still_queued(self, batch: Prepared) -> Prepared:
        """``batch`` less the events the spool has dropped since they were read."""
        gone = self.spool.dropped(batch.seqs)
        return batch.without(gone) if gone else batch

    async def _apply(self, result: Acked | Retry, batch: Prepared,
                     dead: Sequence[tuple[int, str]] = ()) -> int:
        """Delete what the upstream acknowledged of ``batch``; dead-letter ``dead`` (seq,
        reason). The events acknowledged, less those the spool dropped meanwhile."""
        if isinstance(result, Retry) and result.omitted:
            given_up = self._left_out(result, batch)
            dead = [*dead, *given_up]
            if len(given_up) == len(result.omitted):  # the rest was acknowledged: done
                result = Acked(result.acked)
                self._reopen = True
            elif result.acked:
                self.attempt = 0   # it answered: progress, not an outage to back off from
        if isinstance(result, Retry) and result.too_big is not None:
            self._too_big(result.too_big, result.error, result.retry_after is not None)
            self._halved = self._halved or result.retry_after is None
        # A connection lost under the batch (Retry.dropped) at a try that follows a failed
        # one (``attempt``: tries failed since the key's last answer): the far end of a slow
        # link gives up on each try of a full batch alike; a reset that comes anyway, once.
        if isinstance(result, Retry) and (result.too_slow or result.dropped and self.attempt):
            self._too_slow(batch, result)
        if isinstance(result, Acked) and result.refused:
            dead = [*dead, *result.refused]
        acked = result.seqs if isinstance(result, Acked) else result.acked
        if self.omitted:   # an event left out before, now acknowledged: forgiven
            for seq in acked:
                self.omitted.forget(seq)
        delivered = 0
        if acked:
            # Not those whose record the spool dropped while they were sent (found
            # damaged): counted there already (dropped_corrupt), and the counts add up.
            delivered = len(acked) - len(self.spool.dropped(acked))
            # Deleted in the background, ACK_GROUP batches per spool call while rows keep
            # coming (each commit has a fixed cost; segment-http's drain, one session: ten
            # batches 39-42k events/s, twenty 43-50k, forty no better), else once the loop
            # waits. _settle deletes them before any resend.
            self._held.append(acked)
            self._held_count += len(acked)
            self._held_delivered += delivered
            self.state.last_ack = CLOCK.elapsed_s()
        # As for acks: not those whose record the spool dropped while they were sent (it
        # keeps no dead letter of them). Counted before the commit takes them out.
        kept = len(dead) - len(self.spool.dropped([seq for seq, _ in dead])) if dead else 0
        if dead and await self._saved(self.spool.dead_letter(
                # Redacted once, as stored: the reason is the upstream's answer, which may
                # echo the request's credentials, and every dead-letter view shows it.
                [(seq, self.cfg.name, redact(reason)) for seq, reason in dead])) and kept:
            self.state.dead_lettered += kept
            log_limited(log, logging.WARNING, f"dead-letter:{self.cfg.name}",
                        "%s refused %d event(s) for good; moved to dead letters: %s",
                        self.cfg.name, kept, dead[0][1])
        match result:
            case Retry(retry_after=wait):
                if self._failed is None or wait is not None:
                    self._failed = result
            case Acked() if acked or dead:  # the upstream answered, even if only to refuse
                # Not back to the first step while the spool's commits of acks fail (the
                # spool's count: this loop may be the key's next since the last failure).
                self.attempt = self.spool.unsaved
                self.state.state = "idle"   # past any backoff or restart (shown: sending)
        if acked:  # last: a hook that raises (a bug) must not undo the ack's bookkeeping
            show = self.on_acked(self.cfg.name, self.stream.key, batch.rows, acked)
            if show is not None:   # with the delete of these rows, not of a later group
                self._held_shown.append(show)
            if self._held_count >= ACK_GROUP * self.cfg.batch_max_events:
                self._ack_held()
        return delivered

    def _too_big(self, size: int, why: str, for_now: bool) -> None:
        """The upstream refused a batch of ``size`` bytes as too big (a websocket's 1009, a
        413 with a Retry-After: ``for_now``), saying ``why``: the upstream's loops send half
        that at most from their next start (supervisor.py), for good or, ``for_now``, until
        it eases (_eased); an event that alone is too big is given up when sent alone
        (Refused)."""
        state, limit = self.state, max(1, size // 2)
        if state.frame_limit_bytes is None or limit < state.frame_limit_bytes:
            state.frame_limit_bytes = limit
            # For now: from the first batch answered after its wait (_easing).
            state.frame_limit_eases_at = math.inf if for_now else None
            # Each halving once (a line or two per run, at most about twenty): not limited.
            log.warning("upstream %s refused a batch of %d bytes as too big (%s): batches to "
                        "it are now at most %d bytes; set batch_max_bytes to what it takes",
                        self.cfg.name, size, why, limit)
        elif for_now and state.frame_limit_eases_at is not None:
            # A batch over the limit (another key's loop, started before it) refused for
            # now: the upstream still refuses that much, and its minute starts again.
            state.frame_limit_eases_at = math.inf

    def _easing(self, eases_at: float, batch: Prepared) -> None:
        """``batch`` was answered under a limit a 413 with a Retry-After set: the first one
        starts the LIMIT_EASE_S its upstream must answer the smaller batches for (counted
        from the 413, they went by in a longer Retry-After's wait, and the first smaller
        batch answered doubled the limit back), and one after them eases it. A batch over
        the limit (another key's, its loop started before the 413) is none of them: its
        answers eased the limit during the refused key's wait, which then sent a batch as
        large as the one refused, to be refused again."""
        limit = self.state.frame_limit_bytes
        if limit is not None and sum(map(len, batch.bodies)) > limit:
            return
        now = self.timing.now()
        if eases_at == math.inf:
            self.state.frame_limit_eases_at = now + LIMIT_EASE_S
        elif now >= eases_at:
            self._eased()

    def _eased(self) -> None:
        """The smaller batches a 413 with a Retry-After asked for have been answered for
        LIMIT_EASE_S: the limit doubles (at batch_max_bytes it is gone), and a new loop
        sends the larger batches. Another such 413 halves it again."""
        state, full = self.state, self.cfg.batch_max_bytes
        limit = 2 * (state.frame_limit_bytes or full)
        if limit >= full:
            state.frame_limit_bytes = state.frame_limit_eases_at = None
            log.info("upstream %s takes batches again: full batches to it (batch_max_bytes "
                     "= %d)", self.cfg.name, full)
        else:
            state.frame_limit_bytes = limit
            state.frame_limit_eases_at = self.timing.now() + LIMIT_EASE_S
            log.info("upstream %s took the smaller batches for %gs: batches to it are now at "
                     "most %d bytes", self.cfg.name, LIMIT_EASE_S, limit)
        self._resized = self.release is not None

    def _too_slow(self, batch: Prepared, failed: Retry) -> None:
        """No answer within timeout_s to ``batch``, the upstream's 408, or its connection
        lost under it again (``failed``): the upstream's loops send batches of at most half
        its bytes from their next start (supervisor.py), until they are answered in time
        (``_faster``). A batch of one event has nothing smaller to send: it goes again as it
        is (the error says timeout_s must be larger)."""
        state, sent = self.state, sum(map(len, batch.bodies))
        limit = sent // 2
        if len(batch.seqs) > 1 and (state.slow_limit_bytes is None
                                    or limit < state.slow_limit_bytes):
            state.slow_limit_bytes = limit
            late = (f"answered HTTP 408 (its own wait for the request ran out) to a batch of "
                    f"{sent} bytes" if failed.error.startswith(f"HTTP {REQUEST_TIMEOUT}")
                    else f"lost the connection under a batch of {sent} bytes again, before "
                    "any answer (its own wait for the body ran out?)"
                    if failed.dropped and not failed.too_slow
                    else f"gave no answer within {self.cfg.timeout_s:g}s (timeout_s) to a "
                    f"batch of {sent} bytes")
            # Each halving once (a line or two per episode, at most about twenty).
            log.warning("upstream %s %s (a slow link?): batches to it are now at most %d "
                        "bytes, until they are answered in time", self.cfg.name, late, limit)

    def _faster(self, batch: Prepared, took: float) -> None:
        """``batch`` was answered in ``took`` seconds: when a window full of batches of
        twice the upstream's slow-link cut would still be answered within timeout_s at
        this batch's pace (a hang's latency gone, the link faster again), the cut doubles
        (at batch_max_bytes it is gone), and a new loop sends the larger batches. (A
        websocket's frames share the link, the last of a window waiting for those before
        it: grown for one frame, the cut timed out again at every window.) A cut no
        smaller than batch_max_bytes (lowered by a reload) cuts nothing: gone at once."""
        state, cfg = self.state, self.cfg
        limit = state.slow_limit_bytes
        if limit is None:
            return   # before the sum: a len per body of every batch answered
        sent = sum(map(len, batch.bodies))
        if limit < cfg.batch_max_bytes and took * 2 * limit * self.window \
                > cfg.timeout_s * max(sent, 1):
            return
        if 2 * limit >= cfg.batch_max_bytes:
            state.slow_limit_bytes = None
            log.info("upstream %s answers in time again: full batches to it (batch_max_bytes "
                     "= %d)", cfg.name, cfg.batch_max_bytes)
        else:
            state.slow_limit_bytes = 2 * limit
            log.info("upstream %s answered a batch in %.2fs: batches to it are now at most "
                     "%d bytes", cfg.name, took, 2 * limit)
        self._resized = self.release is not None

    def _left_out(self, result: Retry, batch: Prepared) -> list[tuple[int, str]]:
        """Weigh the answer against each of ``result.omitted`` (see OMITTED_LIMIT); those
        whose answers weigh OMITTED_LIMIT are given up: (seq, why) for dead letters. When
        a batch is left out whole, its head is sent alone next: else two events the
        upstream will not take, resent together, were never judged."""
        left = self.omitted   # (the acked ones _apply forgets)
        if len(left) > OMITTED_KEPT:
            left.weights.clear()
            left.alone.clear()
        ids = dict(zip(batch.seqs, batch.ids))
        # Batch order (the high lane first), not seq order, says what was passed over.
        order = {seq: i for i, seq in enumerate(batch.seqs)}
        last = max((order.get(seq, -1) for seq in result.acked), default=-1)
        # A batch left out whole: the upstream reached its head and did not take it, as
        # if it had come alone (it is sent alone next); the rest it may not have reached.
        head = batch.seqs[0] if batch.seqs and not result.acked else None
        if head is not None and len(order) > 1:
            left.alone.add(head)
        given_up = []
        for seq in result.omitted:
            weight = 1 if seq == head else PASSED_OVER if order.get(seq, last) < last else 0
            if not weight:
                continue
            n = left.weights[seq] = left.weights.get(seq, 0) + weight
            if n >= OMITTED_LIMIT:
                left.forget(seq)
                # The id's start: an app's id may be a string of any length, and the
                # reason is stored, logged and shown on /status.
                given_up.append((seq, f"{self.cfg.name} never acknowledged it (id "
                                      f"{shown(ids.get(seq))}): its answers kept leaving it "
                                      "out"))
        return given_up

    def _ack_held(self) -> None:
        if self._held:
            held, self._held, self._held_count = joined(self._held), [], 0
            delivered, self._held_delivered = self._held_delivered, 0
            shown, self._held_shown = self._held_shown, []
            self._track(self._acking, self._ack(held, delivered, shown))

    async def _ack(self, seqs: Sequence[int], delivered: int, shown: list[Shown]) -> None:
        """Delete ``seqs``; count the ``delivered`` of them, and show them, once that is
        saved: an ack not saved is sent again, and acknowledged again."""
        if await self._saved(self.spool.ack(seqs)):
            self.state.acked += delivered
            self.metrics.observe_acked(delivered)
            for show in shown:
                show()

    async def _saved(self, commit: Coroutine[Any, Any, None]) -> bool:
        """Await a spool commit of acks or dead letters; False when it failed. Its rows
        are still queued, so they go again, but only after a backoff: resent at once,
        they went to the upstream as fast as it answered, hundreds of times a second,
        with nothing shown but an older error."""
        try:
            await commit
        except SpoolFull as exc:
            # Commits of acks or dead letters that failed in a row (the spool's disk gone
            # read-only or full, say): each backoff is longer, however often the upstream
            # answers.
            self.attempt = max(self.attempt, self.spool.unsaved - 1)
            if self._failed is None:
                self._failed = Retry(f"the spool could not record what the upstream answered "
                                     f"({exc}): sending it again")
            self.wake.set()
            return False
        return True

    async def _settle(self, timeout: float | None = None) -> None:
        """Let every in-flight batch finish, so no row is sent twice concurrently, then
        the deletes of the rows they acked (held ones included). With a ``timeout`` (a
        stop), the batches get that long before they are cut short; the deletes are
        waited for in full (local, as the spool's own close waits for its commits): one
        cancelled might commit only after the next loop read its rows, and send them."""
        for tasks, limit in ((self._tasks, timeout), (self._acking, None)):
            self._ack_held()
            if not tasks:
                continue
            done, pending = await asyncio.wait(set(tasks), timeout=limit)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _back_off(self) -> float:
        """Count and report the failure; the delay before the next try."""
        failed, self._failed = self._failed, None
        assert failed is not None
        told = ""   # the upstream's own wait, when it is the one waited out (an hour, maybe)
        if failed.retry_after is not None:
            delay = self.backoff.retry_after(failed.retry_after, self.attempt)
            cap = self.backoff.retry_after_cap_s
            if delay == min(failed.retry_after, cap):
                told = (f"{NEXT_TRY}{delay:.0f}s, as its Retry-After asks"
                        if failed.retry_after <= cap else
                        f"{NEXT_TRY}{delay:.0f}s, its Retry-After of "
                        f"{_asked(failed.retry_after)} capped")
        else:
            delay = self.backoff.delay(self.attempt)
        self.attempt += 1
        self.state.state = "backoff"
        self.state.retries += 1
        self.state.error(failed.error or "failed", told)
        # Every key's loop backs off on its own: once a minute per upstream, counted.
        log_limited(log, logging.WARNING, f"upstream-down:{self.cfg.name}",
                    "upstream %s: %s; retrying in %.1fs", self.cfg.name, failed.error, delay)
        return delay

    async def pause(self, delay: float) -> None:
        """Sleep ``delay`` s; a stop or `outpost flush` cuts it short, new data does not.
        ``interrupt`` is cleared only at the start of a step, so one set meanwhile counts."""
        await self.timing.wait(self.interrupt, delay)

    def poke(self) -> None:
        self.wake.set()

    def flush(self) -> None:
        self.flush_now = True
        self.attempt = 0
        self.interrupt.set()
        self.wake.set()

    async def _finish_sends(self) -> None:
        """A hold's stop: wait for the batches in flight to be answered (each send ends
        within timeout_s), unless a stop in a hurry (a shutdown, a reload) comes meanwhile;
        cut after a grace, a slow upstream's answer was lost and its events sent again."""
        hurry: asyncio.Task[bool] | None = None
        try:
            while self._tasks and not self._hurry.is_set():
                if hurry is None:
                    hurry = asyncio.create_task(self._hurry.wait())
                await asyncio.wait({*self._tasks, hurry}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if hurry is not None:
                hurry.cancel()

    def stop(self, hurry: bool = True) -> None:
        """Stop the loop; what it has in flight gets ``grace_s`` to be answered, or, not in
        a ``hurry`` (a hold), as long as its sends take."""
        self.stopping = True
        if hurry:
            self._hurry.set()
        if self._connecting is not None:
            self._connecting.cancel()
        self.interrupt.set()
        self.wake.set()


# Past it, a Retry-After is shown in words: a broken upstream's hundreds of digits (or
# more than a float holds: inf) crowded out its own error.
_CENTURY_S = 100 * 365.25 * 86400


def _asked(seconds: float) -> str:
    """A Retry-After's wait as status shows it."""
    return f"{seconds:.0f}s" if seconds < _CENTURY_S else "over a century"


def _oldest(rows: Sequence[Row]) -> int:
    """The receipt time of the oldest of ``rows`` (each lane's first row is its oldest)."""
    first = rows[0]
    if rows[-1].lane == first.lane:
        return first.received
    return min(first.received, next(r.received for r in rows if r.lane != first.lane))


def _retrieved(fut: asyncio.Future[_Ready]) -> None:
    """A dropped read's outcome, taken so that asyncio does not report it as lost."""
    if not fut.cancelled():
        fut.exception()
