"""One prober per upstream: finds out, cheaply, the moment an unreachable upstream is back.

A key whose send fails parks for its backoff, which grows to a minute; an upstream
that comes back after a long outage would wait that minute. So each failure without
the upstream's own Retry-After makes the upstream *suspect*, and its prober tries a
TCP connect (``UplinkBase.reach``) at once:

- it fails: the network or the host is down. The upstream is marked unreachable
  (status shows it, and since when) and probed every ``PROBE_S`` while it has
  anything queued; the first probe that connects calls ``back``, which retries the
  upstream's parked keys at once, and starts the recovery's one log line
  (recovery.py: logged once the backlog is delivered, with how many events). An
  ack does the same, at once (``answered``): a flush, or a key's own retry, that
  gets through proves the upstream back before the next probe would.
- it connects: the upstream is up and answered badly (a 5xx, a timeout, a captive
  portal). Its backoff holds: a failing upstream is not hammered with batches.
  Except right after a return: a send that fails less than ``PROBE_S`` after the
  probe that found the upstream back may mean it went away again (it flapped), so
  it is probed once that interval ends; else the keys ``back`` just retried would
  wait out their backoff, up to a minute, while it is unreachable.

Real sends keep their backoff either way; only the probes run every few seconds,
and only while something waits for the upstream. ``kick`` (a network change) ends
a probe wait: an unreachable upstream is probed at once. It leaves alone an
upstream that answered (with errors): its keys keep their backoff (at most a
minute), or a noisy netlink feed, a change every 2 s, would resend every 2 s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from agent.clock import CLOCK
from agent.forwarder.recovery import RecoveryReport
from agent.forwarder.state import UpstreamState
from agent.forwarder.timing import Timer, Timing

log = logging.getLogger("outpost.probe")

PROBE_S = 2.0  # between probes of an unreachable upstream
PROBE_TIMEOUT_S = 3.0  # a connect that takes longer counts as unreachable

Check = Callable[[], Awaitable[str | None]]  # None: reachable; else why not


class Prober:
    """Probes one upstream while it is unreachable and something waits for it."""

    def __init__(self, state: UpstreamState, check: Check, timing: Timing,
                 wanted: Callable[[], bool], back: Callable[[], None],
                 queued: Callable[[], int], interval_s: float = PROBE_S) -> None:
        self.state = state
        self._check = check
        self._timing = timing
        self._wanted = wanted      # anything queued for the upstream (parked or in a loop)
        self._back = back          # retry its parked keys now
        self._interval = interval_s
        self._lost_at: float | None = None   # timing clock: when a probe first failed
        self._timer: Timer | None = None
        self._probe: asyncio.Task[None] | None = None
        self._live_at: float | None = None   # timing clock: the last probe that connected
        self._returned = False   # that probe found the upstream back after an outage
        self._recovery = RecoveryReport(state, timing, queued, interval_s)
        self._acked_at_loss = 0               # state.acked when it was found unreachable

    @property
    def unreachable(self) -> bool:
        return self._lost_at is not None

    @property
    def probing(self) -> bool:
        """A probe is in flight now."""
        return self._probe is not None

    def suspect(self) -> None:
        """A send failed without a Retry-After: probe now, unless a probe is running or
        scheduled, or one connected less than a probe interval ago (a live upstream
        failing many keys' sends is probed once, not once per key); if that probe found
        the upstream back, probe when the interval ends (see the module docstring)."""
        if self._probe is not None or self._timer is not None:
            return
        if self._live_at is not None and self._timing.now() - self._live_at < self._interval:
            if self._returned:
                self._timer = self._timing.call_at(self._live_at + self._interval, self._tick)
            return
        self._start()

    def answered(self) -> None:
        """The upstream acknowledged events: it is reachable. If it was unreachable it is
        back now, as if a probe connected; a probe in flight or due is moot (status said
        unreachable for up to a probe interval while its events went out)."""
        if not self.unreachable:
            return
        self._cancel_timer()
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        self._settle(None)

    def kick(self) -> None:
        """The network changed: an unreachable upstream that something waits for is
        probed now, instead of at its next probe (a probe in flight will do)."""
        if self.unreachable and self._probe is None and self._wanted():
            self._start()

    def stop(self, handover: bool = False) -> None:
        """Stop probing. ``handover`` (a reload): the outage is not over, and the next
        supervisor's prober of the same upstream ``adopt``s it."""
        self._cancel_timer()
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        if not handover:
            self._mark(None, quiet=True)
        self._recovery.finish()

    def adopt(self, old: Prober) -> None:
        """Go on with ``old``'s outage (a reload that left the upstream as it was): its
        start, for status and the recovery line, and its probing, from a probe interval
        on; the loss is not logged again."""
        self._lost_at, self._acked_at_loss, self._live_at, self._returned = \
            old._lost_at, old._acked_at_loss, old._live_at, old._returned
        self.state.unreachable_since = old.state.unreachable_since if self.unreachable else None
        if self.unreachable:
            self._timer = self._timing.call_at(self._timing.now() + self._interval, self._tick)

    def _start(self) -> None:
        self._cancel_timer()
        self._probe = asyncio.create_task(self._run(), name=f"probe-{self.state.name}")

    async def _run(self) -> None:
        try:
            why = await self._check()
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop the probing
            log.exception("probing %s failed", self.state.name)
            why = f"probe error: {type(exc).__name__}"
        self._probe = None
        self.state.probes += 1
        self._settle(why)

    def _settle(self, why: str | None) -> None:
        if why is None:
            self._live_at = self._timing.now()
            was_lost = self._returned = self.unreachable
            self._mark(None)
            if was_lost:
                self._back()
        elif self._wanted():
            self._mark(why)
            self._timer = self._timing.call_at(self._timing.now() + self._interval, self._tick)
        else:  # nothing waits for the upstream: no reason to know, no probing
            self._mark(None, quiet=True)

    def _tick(self) -> None:
        self._timer = None
        if self._probe is not None:
            return
        if self._wanted():
            self._start()
        else:
            self._mark(None, quiet=True)

    def _mark(self, why: str | None, *, quiet: bool = False) -> None:
        """Record reachability in the upstream's state; log the loss once, and start the
        recovery's report."""
        now = self._timing.now()
        if why is not None and self._lost_at is None:
            self._recovery.finish()   # what its last return delivered, before this loss
            self._lost_at = now
            self._acked_at_loss = self.state.acked
            self.state.unreachable_since = CLOCK.elapsed_s()
            log.warning("upstream %s unreachable (%s); probing every %gs",
                        self.state.name, why, self._interval)
        elif why is None and self._lost_at is not None:
            # Quiet: nothing waits for the upstream any more. If it acknowledged events
            # meanwhile (acks that reach no prober: a reload's old loops', as they stop),
            # it is back.
            if not quiet or self.state.acked > self._acked_at_loss:
                self._recovery.start(now - self._lost_at, self._acked_at_loss)
            self._lost_at = None
            self.state.unreachable_since = None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
