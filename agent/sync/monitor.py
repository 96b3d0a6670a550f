"""Runs the sources the [sync] rules need, keeps the transmit profile, and gates sending.

The forwarders ask ``may_send`` before a key's loop starts, and ``on_change`` (the
supervisor's re-gating) runs whenever the answer may have changed. Sources run
only for rules that are set: with the defaults, nothing is watched or polled.

``max_hold_h`` is kept by one waiter: while holding (``hold``, or ``priority_only``
for the normal lane), it sleeps until the oldest held event is that old (by the
wall clock or by the time the agent saw pass: a clock set back must not hold events
for good), then releases (``on_release``): every key sends what it has queued then,
and holds again what comes after, timed from then on by the events after the release's
last seq. Not by the oldest event queued: a release still sending a minute later (a slow
link, an upstream's Retry-After) would be released again each minute, up to the events
received meanwhile, which the hold is for. So that a restart does not either, the release's
bound is kept in the spool (``keep``) and the next start goes on with it (``released``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypedDict

from agent.clock import CLOCK
from agent.logs import RateLimiter, log_limited
from agent.settings import SyncConfig
from agent.sync.changes import Changes, Timers
from agent.sync.metered import MeteredSource
from agent.sync.policy import HOLD, NORMAL, Battery, Metered, MeteredReading, decide, held_lanes, sent_lanes
from agent.sync.power import BatterySensor

log = logging.getLogger("outpost.sync")
BATTERY_POLL_S = 60.0   # levels move by minutes; one wakeup a minute, only with the rule set
FIRST_READING_S = 2.0   # start waits this long for the network's cost before sending
RELEASE_RECHECK_S = 60.0   # after a release, before the events after it are looked at
RESTART_S = 30.0   # a watcher that failed is started again after this
HOLD_CHECK_S = 60.0   # while a hold is timed, the clocks are read at least this often


class Waits(Timers, Protocol):
    """The clock the monitor waits and times by (the forwarders' Timing fits): tests move it."""

    async def wait(self, event: asyncio.Event, timeout: float) -> None: ...


async def _keep_nothing(seq: int) -> None:
    pass


class SyncView(TypedDict):
    """The profile as status shows it."""

    profile: str          # normal | priority_only | hold
    reason: str
    metered: str          # yes | no | unknown
    metered_detail: str
    battery_percent: float | None
    on_battery: bool | None
    releases: int         # times max_hold_h sent everything held
    errors: int           # times a watcher or the metered source failed (each logged)
    last_error: str


class SyncMonitor:
    """The transmit profile in force, and the gate the forwarders ask."""

    def __init__(self, cfg: SyncConfig, metered: MeteredSource, battery: BatterySensor,
                 oldest: Callable[[tuple[int, ...], int], Awaitable[float | None]],
                 waits: Waits, on_change: Callable[[], None],
                 on_release: Callable[[], int], released: int = 0,
                 keep: Callable[[int], Awaitable[None]] = _keep_nothing) -> None:
        self.cfg = cfg
        self._source = metered
        self._sensor = battery
        self._oldest = oldest
        self._waits = waits
        self.on_change = on_change
        self.on_release = on_release
        watched = "not read yet" if cfg.on_metered != NORMAL else "not watched (sync.on_metered)"
        self.metered = MeteredReading(Metered.UNKNOWN, watched)
        self.battery: Battery | None = None
        self.profile = decide(cfg, self.metered, None)
        self.releases = 0
        self._released = 0   # the last seq the release under way sends (on_release's)
        self._keep = keep    # saves _released for the next start (the spool)
        self._kept = released   # as saved, by this run or the last
        # The old rules' mode and release: a reload's (carry), or the last run's, whose
        # rules held while a release was under way (0 kept once they no longer held).
        self._carried: tuple[str, int] | None = (HOLD, released) if released else None
        self._first = asyncio.Event()
        self._battery_read = asyncio.Event()
        self._changed = asyncio.Event()   # the profile changed, or data came to an empty hold
        self._poll = asyncio.Event()      # never set: the battery poll's wait only times out
        self._empty = False               # holding with nothing queued: new data wakes the waiter
        self._tasks: list[asyncio.Task[None]] = []
        self.errors = 0
        self.last_error = ""
        self._never = asyncio.Event()   # the restart delay's wait only times out
        self._metered_lines = Changes(log, waits)   # a flapping network is summed up
        # Failed readings: once a minute with a count, timed as the lines above are.
        self._failures = RateLimiter(clock=waits.now)
        self._profile_lines = Changes(log, waits)

    def carry(self, old: SyncMonitor) -> None:
        """A reload that changed [sync], before ``start``: the counts are since the agent
        started (/metrics counters), and the last error stays shown, as an upstream's do;
        and a release under way, which goes on (``forwarders_started``) if the new rules hold
        too (``hold`` or ``priority_only``, as the old ones or not)."""
        self.releases, self.errors, self.last_error = old.releases, old.errors, old.last_error
        self._carried = (old.profile.mode, old._released)
        self._kept = old._kept   # what it saved, a save its stop cut short included

    async def start(self) -> None:
        """Start the sources; wait briefly for the first metered reading, so a hold on a
        metered network holds from the first send."""
        if self.cfg.on_low_battery != NORMAL:
            self._run("battery", self._poll_battery, self._battery_lost)
            with contextlib.suppress(asyncio.TimeoutError):   # a low battery holds at once too
                await asyncio.wait_for(self._battery_read.wait(), FIRST_READING_S)
        if self.cfg.on_metered != NORMAL:
            self._run("metered network", lambda: self._source.watch(self._metered),
                      lambda: self._metered(MeteredReading(Metered.UNKNOWN, self.last_error)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._first.wait(), FIRST_READING_S)
        carried, self._carried = self._carried, None
        if carried is not None and held_lanes(carried[0]) and held_lanes(self.profile.mode):
            # New rules that hold, as the old ones did (the same lanes or not, as a change
            # of profile between two that hold: _update): their waiter times only what
            # came after the release under way, which ``forwarders_started`` goes on with.
            self._released = carried[1]
        await self._save()   # none goes on (rules that send everything): none is kept
        if self.cfg.on_metered != NORMAL or self.cfg.on_low_battery != NORMAL:
            self._run("max_hold_h", self._keep_max_hold)

    def _run(self, what: str, work: Callable[[], Awaitable[None]],
             lost: Callable[[], None] = lambda: None) -> None:
        self._tasks.append(asyncio.create_task(self._supervise(what, work, lost),
                                               name=f"sync-{what}"))

    async def _supervise(self, what: str, work: Callable[[], Awaitable[None]],
                         lost: Callable[[], None]) -> None:
        """Run ``work`` for good: whatever it raises is logged with its traceback, counted,
        shown as ``last_error``, ``lost`` forgets its reading (a failed source reads as
        unknown: it must not keep a hold), and it starts again (a bug must not freeze the
        profile)."""
        while True:
            try:
                await work()
                return
            except Exception as exc:  # noqa: BLE001 - reported below, then restarted
                self.errors += 1
                self.last_error = f"{what}: {type(exc).__name__}: {exc}"
                # Limited: a failure that persists (a battery the OS cannot read) comes
                # back at each restart; counted each time, logged once a minute.
                log_limited(log, logging.ERROR, f"watch-failed:{what}:{type(exc).__name__}",
                            "transmit profile: watching the %s failed; restarting in %gs",
                            what, RESTART_S, exc_info=exc)
                lost()
            await self._waits.wait(self._never, RESTART_S)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._metered_lines.close()
        self._profile_lines.close()

    def may_send(self, key: str) -> tuple[int, ...]:
        """The lanes of ``key`` that may be sent now (none: its loop may not run)."""
        return sent_lanes(self.profile.mode)

    def on_new_data(self) -> None:
        """After a commit: a hold with nothing queued now has an oldest event to time."""
        if self._empty:
            self._empty = False
            self._changed.set()

    def forwarders_started(self, release: Callable[[int], int]) -> None:
        """After a start or a reload, with the new forwarders' ``release``. A release under
        way ended with the forwarders (or the agent) it ran in: it goes on up to its own
        bound (a fresh one would send what came after it too, young, on the network the
        hold is for), with the events queued before it of keys a reload routed, as it
        would have sent them.
        Those after it, untimed while no upstream took them (held.py), are timed from
        now on: the waiter looks again, or, with no app posting, they would be held for
        good."""
        self._empty = False
        if self._released:
            release(self._released)
        self._changed.set()

    def view(self) -> SyncView:
        b = self.battery
        return {"profile": self.profile.mode, "reason": self.profile.reason,
                "metered": self.metered.state.value, "metered_detail": self.metered.detail,
                "battery_percent": b.percent if b else None,
                "on_battery": (not b.plugged) if b else None, "releases": self.releases,
                "errors": self.errors, "last_error": self.last_error}

    def _metered(self, reading: MeteredReading) -> None:
        if reading.failed:   # the source could not read: unknown, as for a watcher that failed
            self.errors += 1
            self.last_error = f"metered network: {reading.detail}"
            # Each one, repeats too: a repeat within the minute is counted in the next line,
            # so the log never ends on a good reading while the failures go on.
            log_limited(log, logging.WARNING, "metered-failed", "%s", self.last_error,
                        limiter=self._failures)
            if reading != self.metered:
                self._metered_lines.logged("metered network: %s (%s)", reading.state.value,
                                           reading.detail)
        elif reading != self.metered:
            self._metered_lines.log("metered network: %s (%s)", reading.state.value, reading.detail)
        self.metered = reading
        self._first.set()
        self._update()

    def _battery_lost(self) -> None:
        self.battery = None   # as no battery: never low
        self._battery_read.set()   # start need not wait for a reading that failed
        self._update()

    async def _poll_battery(self) -> None:
        while True:
            self.battery = self._sensor()
            self._battery_read.set()
            self._update()
            await self._waits.wait(self._poll, BATTERY_POLL_S)

    def _update(self) -> None:
        profile = decide(self.cfg, self.metered, self.battery)
        was, self.profile = self.profile, profile
        # Only a change of mode re-gates: "battery 19%" becoming "battery 18%" must not
        # stop the loops a max_hold_h release started.
        if profile.mode == was.mode:
            return
        self._profile_lines.log("transmit profile: %s (%s)", profile.mode, profile.reason)
        if not held_lanes(was.mode) or not held_lanes(profile.mode):
            # To or from sending everything: no release is under way, the profile times
            # all. Between two that hold (hold, priority_only), a release under way goes
            # on (Supervisor.regate): timed afresh from 0, it was released again at once,
            # with the events that came after it, young, on the network the hold is for.
            self._released = 0
        self._changed.set()
        self.on_change()

    async def _keep_max_hold(self) -> None:
        limit_s = self.cfg.max_hold_h * 3600
        while True:
            self._changed.clear()
            await self._save()   # a release ended by a profile that sends everything
            held = held_lanes(self.profile.mode)
            if not held:
                await self._changed.wait()
                continue
            # Before the look: a commit while it reads then wakes the wait below.
            self._empty = True
            age = await self._oldest(held, self._released)
            if age is None:
                await self._changed.wait()
                continue
            self._empty = False
            left = limit_s - age
            if left > 0:
                await self._wait_held(left)
                continue
            self._release()
            await self._save()
            await self._waits.wait(self._changed, RELEASE_RECHECK_S)

    async def _wait_held(self, left_s: float) -> None:
        """Wait until the oldest held event is ``left_s`` older, by the wall clock or by
        the agent's own time (the clocks held_age_s reads), or the profile changes.
        Not one long wait on the event loop's clock: it stands still while the machine
        sleeps, so a laptop that slept past max_hold_h sent up to that wait's length of
        waking time late (days, for one awake minutes a day). The other two move on
        (agent/clock.py): they are read every HOLD_CHECK_S (the spool is not)."""
        wall_end = CLOCK.wall_ms() + left_s * 1000
        own_end = CLOCK.elapsed_ms() + left_s * 1000
        while not self._changed.is_set():
            rest_ms = min(wall_end - CLOCK.wall_ms(), own_end - CLOCK.elapsed_ms())
            if rest_ms <= 0:
                return
            await self._waits.wait(self._changed, min(rest_ms / 1000, HOLD_CHECK_S))

    async def _save(self) -> None:
        """Keep the release's bound, when it changed, for the next start."""
        if self._released != self._kept:
            self._kept = self._released
            await self._keep(self._released)

    def _release(self) -> None:
        log.info("holding (%s), but the oldest queued event is %g h old (sync.max_hold_h): "
                 "sending everything queued", self.profile.reason, self.cfg.max_hold_h)
        self.releases += 1
        self._released = self.on_release()
