"""The ingest side's single entry into the spool, shared by every dialect (it implements
agent/dialects/base.py's IngestSink)."""

from __future__ import annotations

import asyncio
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from functools import partial

from agent.dialects import offload
from agent.dialects.base import MAX_KEY_CHARS, Routes
from agent.dialects.replies import KeyRefused
from agent.families.enrich import Enrich
from agent.families.errors import Invalid
from agent.families.event import Event, keys_of, longer_than
from agent.metrics import Metrics
from agent.server.admission import Admission, Ticket
from agent.server.limits import RouteLimits
from agent.spool import Spool

# How long a new key taken for a request counts toward listen.max_keys at most: a request
# refused before it reaches the spool (an invalid event, say) gives its place back then.
KEY_HELD_S = 60.0
# Events a request may have for its routes' shapes (as_stored) to be taken on the loop:
# a few ms of mapping at most; more go to the parse worker.
MAP_INLINE_MAX = 256


# What each kind of character that is not printable is, for a key's refusal: the app's
# developer looks for what it names (a no-break space is no control character).
_KINDS = {"Cc": "a control character", "Cf": "an invisible format character",
          "Zs": "a space other than ' '", "Zl": "a line separator",
          "Zp": "a paragraph separator", "Co": "a private-use character"}


def _unprintable(key: str) -> str:
    """Why ``key``, not printable, is refused: a header's byte of no UTF-8 (Latin-1's é) comes
    as a lone surrogate, which is no character the app could look for; any other is named by
    its code point (it shows as nothing, or as a space) and its kind."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "the key is not UTF-8 text (it holds a byte of another encoding)"
    char = next(c for c in key if not c.isprintable())
    kind = _KINDS.get(unicodedata.category(char), "an unassigned code point")
    return f"the key holds {kind} (U+{ord(char):04X})"


class Sink:
    """Key policy, admission, enrichment, route limits and durable store: what every
    dialect calls."""

    def __init__(self, accept_keys: tuple[str, ...], spool: Spool, enrich: Enrich,
                 metrics: Metrics, inflight_budget: int,
                 on_new_data: Callable[[set[str]], None], limits: RouteLimits,
                 on_stored: Callable[[Sequence[Event], int], None] = lambda evs, n: None,
                 *, max_keys: int) -> None:
        self.spool = spool
        self.limits = limits
        self.enrich = enrich
        self.metrics = metrics
        self._accept = frozenset(accept_keys)
        self._max_keys = max_keys
        # New keys taken for requests not yet committed, with when (time.monotonic): each
        # counts toward max_keys, or a Segment batch whose messages name their own keys
        # (and a few at once) could bring thousands past it. Asked from the parse worker too.
        self._pending: dict[str, float] = {}
        self._pending_lock = threading.Lock()
        self.admission = Admission(inflight_budget, metrics)
        # Called with the keys that got new events after each commit (wakes forwarders).
        self.on_new_data = on_new_data
        self._fresh: set[str] = set()  # keys with new events, not yet announced
        self._fresh_events = 0         # and how many new events, not yet counted
        # Called with each request's committed events and how many were new (the live
        # event view); cheap by contract, it runs on every request.
        self.on_stored = on_stored

    def set_accept_keys(self, accept_keys: tuple[str, ...]) -> None:
        self._accept = frozenset(accept_keys)

    def set_limits(self, limits: RouteLimits) -> None:
        """The routes of a reloaded config: they apply from the next request on."""
        self.limits = limits

    def key_refusal(self, key: str | None) -> str | None:
        """accept_keys empty means any non-empty printable key (one with a line break
        would split every log line that names it; an invisible character hides in it) of
        at most MAX_KEY_CHARS characters, and a new one only while fewer than ``max_keys``
        (listen.max_keys) are stored or taken for requests in flight; neither bound holds
        a key an upstream's ``keys`` names (the operator's own). Either way, a key
        its upstream could never be sent under is refused (RouteLimits.key_refusal)."""
        if not key:
            return "no key given"
        if self._accept:
            if key not in self._accept:
                return "not one of listen.accept_keys"
        elif not key.isprintable():
            return _unprintable(key)
        elif len(key) > MAX_KEY_CHARS and key not in self.limits.named:
            return f"the key is longer than {MAX_KEY_CHARS} characters"
        why = self.limits.key_refusal(key)
        if why is None and not self._accept:
            why = self._room_for(key)
        return why

    def _room_for(self, key: str) -> str | None:
        """None if ``key`` is stored or an upstream names it, or taken now as one more of
        the max_keys."""
        known, pending = self.spool.streams, self._pending
        if key in known or key in self.limits.named:
            return None
        with self._pending_lock:
            if key in pending:
                return None
            now = time.monotonic()
            if len(known) + len(pending) >= self._max_keys:
                # Oldest first (insertion order): those of requests refused before the spool.
                while pending and (first := next(iter(pending.items())))[1] < now - KEY_HELD_S:
                    del pending[first[0]]
                # A key's commit makes its stream before the request's store lets its
                # place go: it is counted once, as stored, or the last new app under the
                # limit is refused while another new key's commit runs.
                count = len(known) + sum(k not in known for k in pending)
                if count >= self._max_keys:
                    return (f"a new key, and {count} keys are known already "
                            f"(listen.max_keys = {self._max_keys})")
            pending[key] = now
        return None

    def ticket(self) -> Ticket:
        return self.admission.ticket()

    async def store(self, events: Sequence[Event], limits: Routes | None = None,
                    alike: bool = False) -> int:
        """Commit ``events`` durably, each in the shape its route stores it in
        (``RouteLimits.as_stored``); returns how many were new. Raises SpoolFull, or
        Invalid (too large) for an event its upstream can never carry, or KeyRefused for
        a key a reload took out of listen.accept_keys since the request's head, storing none.
        ``limits``: the routes the request judged its events by, when a reload may have
        come since (a large body is judged on the parse worker); None: those in force.
        ``alike``: every event has the first one's key and family (the caller knows it): the
        key's route is looked up and its announcement taken once, not for each event."""
        if not events:
            return 0
        alike = alike or len(events) == 1   # a single call's event: no set of its keys
        if limits is None:
            limits = self.limits
        try:
            if self._accept and not self._accept.issuperset(
                    (events[0].key,) if alike else keys_of(events)):
                # Its key was let in at the head, and a reload has taken it out of
                # accept_keys since (a body still being read): not stored under it now.
                raise KeyRefused("key refused: not one of listen.accept_keys")
            if len(events) > MAP_INLINE_MAX and limits.maps_any(events):
                # Mapping is 10-40 µs an event: on the loop, a 4 MiB Nucleus message's held
                # it 0.7 s. On the worker, with the request's place in the commit order
                # taken now.
                started = time.perf_counter()
                stored = await self.spool.append(self._as_stored_off_loop(events, limits))
            else:
                kept = self._fitting(limits.as_stored(events, self.spool.index, alike),
                                     limits)
                started = time.perf_counter()
                stored = await self.spool.append(kept)
        finally:
            if self._pending:   # stored, and counted among the spool's keys, or refused
                with self._pending_lock:
                    for key in (events[0].key,) if alike else keys_of(events):
                        self._pending.pop(key, None)
        self.metrics.ingest_latency.observe(time.perf_counter() - started)
        # The live view shows what the app sent, not the shape it is stored in.
        self.on_stored(events, stored)
        if stored:
            # Once per commit, not per request: a commit's requests all resume in the same
            # turn of the loop, and the announcement runs in the next. So does the count
            # of new events, the history's "in" beside "out" (resends are not): its
            # minute's bucket was ~4k instructions a request (callgrind).
            if not self._fresh:
                asyncio.get_running_loop().call_soon(self._announce)
            self._fresh_events += stored
            if alike:
                self._fresh.add(events[0].key)
            else:
                self._fresh |= keys_of(events)
        return stored

    async def _as_stored_off_loop(self, events: Sequence[Event], limits: Routes
                                  ) -> Sequence[Event]:
        # The dedupe index is only read there (a set's `in`: one step under the GIL).
        kept = await offload.on_worker(partial(limits.as_stored, events, self.spool.index))
        return self._fitting(kept, limits)

    @staticmethod
    def _fitting(kept: Sequence[Event], limits: Routes) -> Sequence[Event]:
        """``kept``, once none is too large for its route (else Invalid: none stored)."""
        # Each event measured only when one is longer than any route's limit allows for
        # (Routes.least): every Nucleus route sets one, far above nearly every event, and
        # a Columns' event is made at each read.
        if not limits.active:
            return kept
        if longer_than(kept, limits.least):
            for ev in kept:
                why = limits.oversize(ev)
                if why is not None:
                    raise Invalid(why, too_large=True)
        return kept

    def _announce(self) -> None:
        fresh, self._fresh = self._fresh, set()
        self.metrics.observe_in(self._fresh_events)
        self._fresh_events = 0
        self.on_new_data(fresh)
