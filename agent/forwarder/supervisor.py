"""Runs one StreamForwarder per (upstream, key) with queued events.

A loop starts when its key has data and ends once its queue has stayed empty
for the upstream's ``flush_interval_s`` (``StreamForwarder.released``): with
``accept_keys = []`` any local process can invent keys, and an idle key must
not keep a task, an uplink and a connection. New data for a key whose loop has
ended, or is ending, starts a fresh one.

A loop that must back off (the upstream is down, or refuses an invented key)
ends too, and its key is parked (parking.py): its retry time and backoff step
wait in a heap, under one timer for all keys, until the timer starts a fresh
loop. New data for a parked key waits with it (a failing upstream is not
hammered sooner); a flush starts every parked key at once; a stop just forgets
them. So a key waiting for a retry costs a few hundred bytes, not a loop (~10 KB).

A backoff grows to a minute, but an upstream that comes back is used within
seconds: each upstream's prober (probe.py) probes it while it is unreachable and
retries its parked keys the moment it answers, and a network change
(``network_changed``, from agent/netwatch.py) probes the unreachable ones at once.

A loop starts only if ``may_send(key)`` (the transmit profile, agent/sync/) lets one
of the key's lanes with events go (``priority_only``: the high lane alone); ``regate``
runs when that answer may have changed: it stops the loops now held (their in-flight
batches settle), tells running loops which lanes they may send, and starts every key
with data it lets go. ``release`` (``max_hold_h``) lets every key send every lane up to
the last seq committed then; each loop then goes back to what ``may_send`` lets go. A key
whose loop backs off, waits in line or is stopping keeps that bound for its next loop,
and a running loop keeps it through a ``regate`` to a profile that still holds: the
monitor does not release those events again (sync/monitor.py).

The loops of one upstream share its slots (slots.py): at most ``BATCHES_IN_FLIGHT``
batches in flight from all its keys, so memory stays bounded however many keys have
queues. And at most ``MAX_LOOPS`` loops run per upstream: a flush, an upstream's return
or a start with many keys waiting would start one for each at once (~10 KB each); the
other keys wait in line, in the order they asked, and while any waits a loop whose
queue is empty ends at once instead of lingering ``flush_interval_s``, and one that has
run two of them gives its turn and goes to the back (``StreamForwarder._turn_over``).

``_run`` is the one supervision point: whatever a forwarder, its delivery
tasks or its uplink's own tasks raise unexpectedly ends up there, is logged
with its traceback, counted (``crashes`` in /status and /metrics), shown as
``last_error``, and the loop starts again with a fresh uplink after a
jittered, capped backoff that a stop cuts short.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import aiohttp

from agent.families.facts import DeviceFacts
from agent.families.lanes import LANES
from agent.forwarder.backoff import BACKOFF, Backoff
from agent.forwarder.parking import Parked, ParkingLot
from agent.forwarder.probe import PROBE_TIMEOUT_S, Prober
from agent.forwarder.slots import Slots
from agent.forwarder.state import UpstreamState
from agent.forwarder.stream import (
    STOP_GRACE_S,
    AckHook,
    LeftOut,
    Release,
    Shown,
    StreamForwarder,
    ignore_acks,
)
from agent.forwarder.timing import LOOP_TIMING, Timer, Timing
from agent.logs import log_limited
from agent.metrics import Metrics
from agent.netwatch import NetWatch, watch
from agent.settings import Config, UpstreamConfig
from agent.spool import Spool
from agent.spool.types import Row
from agent.uplinks import lookup
from agent.uplinks.base import Uplink
from agent.uplinks.http_common import client_session
from agent.uplinks.registry import make_uplink, uplink_class

log = logging.getLogger("outpost.supervisor")
# A loop that ran this long before crashing starts again from the first backoff step.
STABLE_S = 60.0
# Network changes come in bursts (a link, then its addresses, then routes): the first
# probes at once, the rest of a burst in one more probe this long after it.
NET_GAP_S = 2.0
# Loops per upstream at once. 3,000 keys resuming together took ~28 MB; a key's drain
# needs one loop, and 256 keys' batches are more than the upstream's slots (64) take.
MAX_LOOPS = 256

UplinkFactory = Callable[[UpstreamConfig, str, aiohttp.ClientSession, str], Uplink]
NetWatcher = Callable[[Callable[[], None]], NetWatch | None]


@dataclass(frozen=True)
class InLine:
    """A key waiting for a loop: its retry step, a release's bound, whether a flush
    asked for its events (sent at once when its loop starts)."""

    attempt: int
    until: int | None
    flushed: bool = False


@dataclass(frozen=True)
class Seams:
    """What the forwarders are built with besides config: how an uplink is made, the
    time they wait by, their backoff policy, what tells them the network changed and
    how long a stop waits for batches in flight. Tests replace these to inject faults,
    to let time pass without waiting, to keep other processes' network changes out of
    a test about probing, and to cut a batch short without waiting 5 s."""

    make_uplink: UplinkFactory = make_uplink
    timing: Timing = LOOP_TIMING
    backoff: Backoff = BACKOFF
    watch_network: NetWatcher = watch
    grace_s: float = STOP_GRACE_S
    max_loops: int = MAX_LOOPS


class Supervisor:
    """Owns the forwarders and the HTTP client session they share."""

    def __init__(self, cfg: Config, spool: Spool, facts: DeviceFacts, metrics: Metrics,
                 seams: Seams = Seams(),
                 may_send: Callable[[str], tuple[int, ...]] = lambda key: LANES,
                 on_acked: AckHook = ignore_acks) -> None:
        self.cfg = cfg
        self.on_acked = on_acked   # each loop's upstream acks: the live event view
        self.may_send = may_send
        self.spool = spool
        self.facts = facts
        self.metrics = metrics
        self.states = {u.name: UpstreamState(u.name, u.protocol) for u in cfg.upstreams}
        # The queues summed per upstream of this config, kept by each commit from now on:
        # what status and the probers' recovery reports read (one pass over the keys here).
        spool.books.regroup(cfg.route_name)
        self._slots = {u.name: Slots() for u in cfg.upstreams}   # batches in flight
        self.loops: dict[str, StreamForwarder] = {}   # by local key: keys with data only
        self._tasks: set[asyncio.Task[None]] = set()   # with loops still closing their uplink
        self._running: Counter[str] = Counter()   # loop tasks per upstream
        # Per upstream, keys waiting for a loop (MAX_LOOPS), in the order they asked.
        self._line: dict[str, dict[str, InLine]] = {}
        self._lot = ParkingLot(self._parked)   # keys waiting to retry
        self._omitted: dict[str, LeftOut] = {}   # by key: see stream.LeftOut
        self._timer: Timer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self.seams = seams
        self.probers: dict[str, Prober] = {}   # built by start: after a reload's _carry_states
        self._handed: dict[str, Prober] = {}   # a reload's: see take_over
        self._netwatch: NetWatch | None = None
        self._net_timer: Timer | None = None
        self._last_kick: float | None = None

    def take_over(self, old: Supervisor) -> None:
        """A reload, before ``start``: an upstream whose name, url, protocol and key are
        unchanged keeps its outage (probe.py), and each of its parked keys still routed
        to it its retry time and backoff step (a retry the stop cut short: its step, and
        no wait): a Retry-After is waited out in full. A changed upstream starts afresh.
        ``old`` has stopped, with ``handover``."""
        kept = {u.name for u in self.cfg.upstreams
                if (was := _named(old.cfg, u.name)) is not None and _same(was, u)}
        self._handed = {name: old.probers[name] for name in kept if name in old.probers}
        for key, parked in old._lot.items():
            up = self.cfg.route(key)
            if up is not None and up.name == parked.upstream and up.name in kept:
                self._lot.park(key, parked)
        for up in self.cfg.upstreams:
            if up.name not in kept:   # another upstream by that name: the old one's limits
                state = self.states[up.name]   # (service.py carried them)
                state.frame_limit_bytes = state.slow_limit_bytes = None
                state.frame_limit_eases_at = None
                was = _named(old.cfg, up.name)   # and its last error: status names what
                if was is not None and state.last_error is not None:   # changed (state.py)
                    state.reloaded = tuple(f for f in _TARGET if f in state.reloaded
                                           or getattr(was, f) != getattr(up, f))
        for name in kept:
            # Its keys wait on as they did: status says so (a new state would say idle).
            if self._lot.count(name) and old.states[name].state in ("backoff", "restarting"):
                self.states[name].state = old.states[name].state

    async def start(self) -> None:
        self._session = client_session()
        self.probers = {}
        for up in self.cfg.upstreams:
            prober = self.probers[up.name] = self._prober(up)
            handed = self._handed.pop(up.name, None)
            if handed is not None:
                prober.adopt(handed)
            else:   # a new or changed upstream: an outage of what it was is not its own
                self.states[up.name].unreachable_since = None
        self._netwatch = self.seams.watch_network(self.network_changed)
        self._retry()   # keys parked before a reload (take_over): those due start now
        for key in list(self.spool.streams):
            if key not in self._lot:
                self._ensure(key)

    def on_new_data(self, keys: set[str]) -> None:
        for key in keys:
            if key in self._lot:  # its retry will send this too
                continue
            loop = self.loops.get(key)
            if loop is None or loop.released:
                loop = self._ensure(key)
            if loop is not None:
                loop.poke()

    def _ensure(self, key: str, attempt: int = 0,
                until: int | None = None) -> StreamForwarder | None:
        running = self.loops.get(key)
        if running is not None and not running.released:
            # One loop per key: a second would resend what the first has in flight. One
            # still stopping (a hold) starts its successor itself when it ends (_ended).
            return running
        up = self._sized(self.cfg.route(key))
        stream = self.spool.streams.get(key)
        # An empty queue needs no loop (a start with 100,000 idle keys starts none).
        if up is None or stream is None or stream.depth == 0 or self._session is None \
                or self._stopping:
            return None
        lanes, bounds = self._lanes(key, until)
        if not stream.queued(lanes):
            return None
        if self._running[up.name] >= self.seams.max_loops:
            self._wait_in_line(up.name, key, attempt, until)
            return None
        try:
            loop = StreamForwarder(up, stream, self.spool, self._uplink(up, key),
                                   self.states[up.name], self.metrics,
                                   uplink_class(up.protocol).window(up),
                                   release=Release(up.flush_interval_s,
                                                   functools.partial(self._park_loop, key),
                                                   functools.partial(self._crowded, up.name)),
                                   attempt=attempt, lanes=lanes, timing=self.seams.timing,
                                   backoff=self.seams.backoff, on_acked=self._acked,
                                   omitted=self._omitted.setdefault(key, LeftOut()),
                                   slots=self._slots[up.name], grace_s=self.seams.grace_s)
        except Exception as exc:  # noqa: BLE001 - a bug: reported, and the key tried again
            self._not_built(key, up.name, exc, attempt, until)
            return None
        loop.until = bounds
        self.loops[key] = loop
        task = asyncio.create_task(self._run(key, loop), name=f"forward-{up.name}")
        self._tasks.add(task)
        self._running[up.name] += 1
        task.add_done_callback(functools.partial(self._ended, key, loop))
        return loop

    def _sized(self, up: UpstreamConfig | None) -> UpstreamConfig | None:
        """``up``, its batches no larger than what it was found to take (1009), nor than
        what its link carries within timeout_s."""
        if up is None:
            return None
        state = self.states[up.name]
        limits = [n for n in (state.frame_limit_bytes, state.slow_limit_bytes) if n is not None]
        if not limits or min(limits) >= up.batch_max_bytes:
            return up
        return replace(up, batch_cut_bytes=min(limits))

    def _lanes(self, key: str, until: int | None
               ) -> tuple[tuple[int, ...], tuple[int | None, ...] | None]:
        """The lanes ``key``'s loop may send, and a release's bounds (StreamForwarder.until):
        with ``until``, every lane, those the profile holds up to that seq."""
        sent = self.may_send(key)
        if until is None:
            return sent, None
        return LANES, tuple(None if lane in sent else until for lane in LANES)

    def _ended(self, key: str, loop: StreamForwarder, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._running[loop.cfg.name] -= 1
        requeue = False
        if self.loops.get(key) is loop:  # not yet replaced by a loop for newer data
            if not loop.omitted or not loop.stream.depth:
                self._omitted.pop(key, None)   # (a successor shares the same LeftOut)
            del self.loops[key]
            # Its turn passed to a key in line: it goes to the back of the line.
            requeue = loop.yielded and key not in self._lot
            # Stopped by regate, which may have let the key go again since; unless the
            # loop parked the key on its way out: then its retry time starts the next.
            if loop.stopping and key not in self._lot:
                self._send_now(key, 0, _bound(loop))   # a release since (max_hold_h) goes on
        self._next_in_line(loop.cfg.name)
        if requeue and key not in self.loops:   # a release under way (max_hold_h) goes on
            # At its backoff step: a turn passed, or a 1009's halving (stream.py's _halved),
            # is no progress, and the next failure must not be retried as if the first.
            self._send_now(key, loop.attempt, until=_bound(loop))
        # Last: one that handed over (yielded) counted sending until its successor did.
        loop.ended()

    def _wait_in_line(self, name: str, key: str, attempt: int, until: int | None) -> None:
        line = self._line.setdefault(name, {})
        if key in line:   # a release since (max_hold_h) bounds what its loop sends
            if until is not None:
                line[key] = InLine(line[key].attempt, until, line[key].flushed)
            return
        line[key] = InLine(attempt, until)
        self.states[name].waiting = len(line)
        if len(line) == 1:   # the loops of this upstream that linger end now (_crowded)
            for loop in self.loops.values():
                if loop.cfg.name == name:
                    loop.poke()

    def _crowded(self, name: str) -> bool:
        return bool(self._line.get(name))

    def _next_in_line(self, name: str) -> None:
        line = self._line.get(name)
        while line and not self._stopping and self._running[name] < self.seams.max_loops:
            key = next(iter(line))
            turn = line.pop(key)
            self.states[name].waiting = len(line)
            loop = self._send_now(key, turn.attempt, turn.until)
            if loop is not None and turn.flushed:
                loop.flush()

    def regate(self) -> None:
        """``may_send`` may have changed: stop the loops it holds, start the keys it lets go."""
        for key, loop in list(self.loops.items()):
            if loop.stopping or loop.released:
                continue
            lanes, until = self.may_send(key), None
            bound = _bound(loop)
            if bound is not None and lanes != LANES:
                # A release under way (max_hold_h) goes on under a profile that still
                # holds: the monitor times only what came after it (sync/monitor.py).
                lanes, until = self._lanes(key, bound)
            if not lanes:
                loop.until = None
                loop.stop(hurry=False)   # a send in flight finishes, its ack kept
            elif lanes != loop.lanes or until != loop.until:
                # Fewer lanes: what is in flight settles, nothing more of the others is
                # read. More: the next read takes them. Either way no resend is needed.
                # Sending everything, a release under way ends.
                loop.lanes, loop.until = lanes, until
                loop.poke()
        self._start_all()

    def release(self, until: int | None = None) -> int:
        """``max_hold_h``: send every key's events queued now (or up to ``until``: a
        release a reload cut short), in every lane; then each loop goes back to what
        ``may_send`` lets go, and what comes later is held as the profile says (with its
        own max_hold_h). Returns the last seq it lets go."""
        # Not last_seq: a commit still under way could reach its key after the key's
        # loop ended the release, and the monitor, which times only the events after
        # this bound, would never time it.
        until = self.spool.committed_seq if until is None else until
        for key, loop in list(self.loops.items()):
            if loop.released:   # its key starts afresh below
                continue
            lanes, loop.until = self._lanes(key, until)
            if not loop.stopping:   # one stopping hands its bound to the next (_ended)
                loop.lanes = lanes
                loop.poke()
        self._lot.release(until)   # a key backing off sends them at its retry
        self._start_all(until)
        return until

    def _start_all(self, until: int | None = None) -> None:
        """Start a loop for every key with data that has none (parked keys wait): events
        the profile held, let go now, go at once."""
        for key, stream in self.spool.streams.items():
            running = self.loops.get(key)
            if stream.depth and key not in self._lot and (running is None or running.released):
                self._send_now(key, 0, until)

    def _park_loop(self, key: str, delay: float, attempt: int, told: bool) -> None:
        """``key``'s loop backs off (Release.park): a release it was sending goes on at its
        retry, or those events, not timed again, would wait for the next release."""
        loop = self.loops.get(key)   # the one parking: it is the key's until it has ended
        self._park(key, delay, attempt, told, _bound(loop) if loop is not None else None)

    def _park(self, key: str, delay: float, attempt: int, told: bool,
              until: int | None = None) -> None:
        up = self.cfg.route(key)
        if up is None:
            return
        when = self.seams.timing.now() + delay
        self._lot.park(key, Parked(when, attempt, up.name, told, until))
        if self._stopping:
            return   # parked for a reload's next supervisor only (take_over)
        if self._timer is None or when < self._timer.when():
            self._set_timer()
        if not told:  # the upstream's own Retry-After says it is up: nothing to probe
            self.probers[up.name].suspect()

    def _parked(self, name: str, n: int) -> None:
        state = self.states.get(name)
        if state is not None:
            state.parked = n
            if not n and state.state in ("backoff", "restarting"):
                # No key waits out a backoff, or a retry of a loop it could not build
                # (_not_built), now. One that left the lot may send nothing (a hold, a
                # flush under one): it waits for that, not for the upstream or a restart.
                state.state = "idle"

    def _send_now(self, key: str, attempt: int, until: int | None) -> StreamForwarder | None:
        """Start the loop of ``key``, whose events go at once (out of the lot, its turn
        in line come, its last loop handed over, let go by the profile): its upstream
        shows so from now (StreamForwarder.resume)."""
        loop = self._ensure(key, attempt, until)
        if loop is not None:
            loop.resume()
        return loop

    def _set_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        when = self._lot.next_due()
        if when is not None:
            self._timer = self.seams.timing.call_at(when, self._retry)

    def _retry(self) -> None:
        # A timer can fire within the clock's resolution before its time (asyncio's loop
        # does): what it was set for is due, or it would be set again for that instant.
        now = self.seams.timing.now()
        if self._timer is not None:
            now = max(now, self._timer.when())
        try:
            for key, parked in self._lot.due(now):
                self._send_now(key, parked.attempt, parked.until)
        finally:  # one timer serves every parked key: a bug with one must not strand the rest
            self._set_timer()

    def _prober(self, up: UpstreamConfig) -> Prober:
        check = functools.partial(uplink_class(up.protocol).reach, up,
                                  min(PROBE_TIMEOUT_S, up.timeout_s))
        return Prober(self.states[up.name], check, self.seams.timing,
                      wanted=lambda: self._lot.count(up.name) + self._running[up.name]
                      + len(self._line.get(up.name, ())) > 0,
                      back=functools.partial(self._resume, up.name),
                      queued=functools.partial(self._queued, up.name))

    def _acked(self, upstream: str, key: str, rows: Sequence[Row],
               seqs: Sequence[int]) -> Shown | None:
        """A loop's upstream ack: the live view's, and proof the upstream is reachable."""
        try:
            return self.on_acked(upstream, key, rows, seqs)
        finally:
            # Not once stopping: a reload's next prober adopts the outage (it would
            # otherwise resume, out of the lot it hands over, the keys parked for it).
            if not self._stopping:
                self.probers[upstream].answered()

    def _queued(self, upstream: str) -> int:
        """Events queued for ``upstream`` (read by its recovery report only)."""
        totals = self.spool.books.groups.get(upstream)
        return totals.depth if totals is not None else 0

    def _resume(self, upstream: str) -> None:
        """``upstream`` answers again: retry its parked keys now, each at its backoff step
        (a send that fails again backs off further). Keys under a Retry-After wait on."""
        try:
            for key, parked in self._lot.take(upstream):
                self._send_now(key, parked.attempt, parked.until)
        finally:
            self._set_timer()

    def network_changed(self) -> None:
        """A link, address or route changed: every unreachable upstream with keys waiting
        is probed now, and retried if it answers (probe.py: one that answered with errors
        keeps its backoff). A burst of changes costs one more probe, later."""
        if self._net_timer is not None or self._stopping:
            return   # the burst's trailing kick is due
        now = self.seams.timing.now()
        if self._last_kick is not None and now - self._last_kick < NET_GAP_S:
            self._net_timer = self.seams.timing.call_at(self._last_kick + NET_GAP_S, self._kick)
        else:
            self._kick()

    def _kick(self) -> None:
        self._net_timer = None
        self._last_kick = self.seams.timing.now()
        # The lookups under way were asked on the old network: a resolver that does not
        # answer would hold the probes, and the sends, that wait for them.
        lookup.forget()
        for prober in self.probers.values():
            prober.kick()

    def _uplink(self, up: UpstreamConfig, key: str) -> Uplink:
        assert self._session is not None
        return self.seams.make_uplink(up, key, self._session, self.facts.machineId)

    async def _run(self, key: str, loop: StreamForwarder) -> None:
        """Run ``loop`` until it stops; restart it after anything it raises."""
        attempt = 0
        clock = self.seams.timing.now
        while True:
            started = clock()
            try:
                await loop.run()
                return
            except Exception as exc:  # noqa: BLE001 - a bug must stop neither this loop nor others
                attempt = 0 if clock() - started > STABLE_S else attempt
                # It crashed as it ended (stopped, or parked): what follows is not this loop's.
                ending = loop.stopping or loop.released
                delay = None if ending else self.seams.backoff.delay(attempt)
                attempt += 1
                self._crashed(loop.cfg.name, exc, delay)
            if delay is None:
                return
            await loop.pause(delay)
            # Its wait is over: it restarts, or ends (a hold, a stop) with nothing restarting;
            # one whose uplink cannot be built says "restarting" again (_not_built).
            if loop.state.state == "restarting":
                loop.state.state = "idle"
            if loop.stopping or self._session is None:
                return
            try:
                loop.uplink = self._uplink(loop.cfg, key)
            except Exception as exc:  # noqa: BLE001 - as in _ensure: reported, tried again
                # Its key's next loop is the lot's: one asked for before this task's end is
                # heard of (a flush) is built afresh, not this one resumed as it ends.
                loop.released = True
                self._not_built(key, loop.cfg.name, exc, attempt, _bound(loop))
                return
            loop.resume()   # what it has queued goes now: shown so, not idle till its read

    def _not_built(self, key: str, name: str, exc: Exception, attempt: int,
                   until: int | None) -> None:
        """Building ``key``'s loop or uplink raised (a bug): reported, and the key parked
        for a retry. Told: the upstream is not suspect, so its prober leaves the key to
        the timer."""
        delay = self.seams.backoff.delay(attempt)
        self._crashed(name, exc, delay)
        self._park(key, delay, attempt + 1, told=True, until=until)

    def _crashed(self, name: str, exc: Exception, delay: float | None) -> None:
        """Report a crash: counted, shown, logged with its traceback; ``delay`` is when
        the key is tried again, None if the loop was ending anyway."""
        state = self.states[name]
        state.crashes += 1
        state.error(f"internal error: {type(exc).__name__}: {exc}")
        if delay is None:
            log_limited(log, logging.ERROR, f"crash:{name}:{type(exc).__name__}",
                        "forwarder for upstream %s crashed as its loop ended", name,
                        exc_info=exc)
            return
        state.state = "restarting"
        log_limited(log, logging.ERROR, f"crash:{name}:{type(exc).__name__}",
                    "forwarder for upstream %s crashed; restarting in %.1fs", name, delay,
                    exc_info=exc)

    def flush(self) -> None:
        parked = self._lot.clear()
        self._set_timer()
        for key, was in parked.items():
            self._send_now(key, 0, was.until)
        for line in self._line.values():   # sent at once as their turn comes
            for key, turn in line.items():
                line[key] = InLine(0, turn.until, flushed=True)
        for loop in self.loops.values():
            loop.flush()

    def batches_in_flight(self) -> int:
        """Batches sent to any upstream and not yet answered (what a stop waits for)."""
        return sum(loop.batches_in_flight for loop in self.loops.values())

    async def stop(self, handover: bool = False) -> None:
        """Stop every loop; ``handover`` (a reload): the parked keys and the probers'
        outages stay, for the next supervisor's ``take_over``."""
        self._stopping = True  # data committed from now on is the next Supervisor's
        if self._timer is not None:   # nothing runs for parked keys: their events wait
            self._timer.cancel()      # in the spool
            self._timer = None
        if self._net_timer is not None:
            self._net_timer.cancel()
            self._net_timer = None
        for prober in self.probers.values():
            prober.stop(handover)
        if self._netwatch is not None:
            self._netwatch.close()
            self._netwatch = None
        loops = list(self.loops.items())
        for _, loop in loops:
            loop.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.loops.clear()
        now = self.seams.timing.now()
        for key, loop in loops:
            if loop.attempt and key not in self._lot:
                # A retry under way, cut short: the next goes on from its backoff step.
                self._lot.park(key, Parked(now, loop.attempt, loop.cfg.name, told=False))
        for name, line in self._line.items():   # so are the keys in line for a loop
            for key, turn in line.items():
                if turn.attempt and key not in self._lot:
                    self._lot.park(key, Parked(now, turn.attempt, name, told=False))
            self.states[name].waiting = 0
        self._line.clear()
        cut = sum(loop.cut_short for _, loop in loops)
        if cut:
            log.warning("stopping the forwarders: %d batch(es) still unanswered after %gs were "
                        "cut short; what the upstream did not acknowledge of them will be "
                        "sent again", cut, self.seams.grace_s)
        if self._session is not None:
            await self._session.close()
            self._session = None


def _bound(loop: StreamForwarder) -> int | None:
    """The last seq of the release (max_hold_h) ``loop`` sends, if one is under way."""
    return max((seq for seq in loop.until or () if seq is not None), default=None)


def _named(cfg: Config, name: str) -> UpstreamConfig | None:
    return next((u for u in cfg.upstreams if u.name == name), None)


# What an upstream of a name sends to, and how: a reload that changes any of them makes
# it another upstream (_same).
_TARGET = ("url", "protocol", "key", "proxy")


def _same(a: UpstreamConfig, b: UpstreamConfig) -> bool:
    """Whether a reload left the upstream itself as it was (its batch sizes, timeouts
    and routes may change): its waits and its outage still hold."""
    return a.name == b.name and all(getattr(a, f) == getattr(b, f) for f in _TARGET)
