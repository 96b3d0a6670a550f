"""Handing freed memory back to the OS after a burst of ingest (glibc only).

Two things kept RSS at its peak long after a burst had been committed:

- Python's small-object allocator takes memory from the OS in 1 MiB arenas and
  returns an arena only once every object in it is freed. A burst fills dozens
  of arenas with short-lived events, and the few long-lived objects created
  meanwhile (a forwarder's batch, a log record) pin them: measured, RSS crept
  up by 4 to 7 MB with each burst of 4 MiB Nucleus posts and never came back.
  ``outpost run`` therefore re-executes itself with ``PYTHONMALLOC=malloc`` on
  glibc (allocator.py), so that objects come from the C allocator, which can
  hand back any free page; measured, the same bursts then leave RSS within 6 MB
  of idle, at no measurable cost in throughput (bench/RESULTS.md). An explicit
  ``PYTHONMALLOC`` in the environment is left alone.
- The C allocator keeps freed memory in its free lists; ``malloc_trim`` returns
  it. ``Trimmer`` calls it once a burst is over.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from agent.logs import log_limited
from agent.metrics import Metrics
from agent.server.allocator import malloc_trim

log = logging.getLogger("outpost.memory")

TRIM_AFTER_BYTES = 4 * 1024 * 1024  # trimming after light traffic would gain nothing
TRIM_QUIET_S = 1.0  # after the last request of a burst: replies sent, connections closed


def settle_start() -> None:
    """Settle what the start has built, the imported modules and the spool with its dedupe
    index, all of which lives as long as the process: exempt it from the cyclic GC, and
    hand back to the OS what building it freed.

    - A burst of ingest triggers full collections, each of which walked the ~47,000
      objects of the imported modules too, holding the GIL for 35 to 140 ms (measured,
      PYTHONMALLOC=malloc): /healthz waited that long.
    - The dedupe index is one set of up to ``dedupe_max_keys`` ints: each collection of its
      generation walked all of it, ~90 ms at 1M keys, once or twice during a start with a
      million queued and at every full collection after. Its ints hold no references.
    - Rebuilding the index frees its scratch (the keys read from the file, the set's
      outgrown tables): 15-17 MB at 1M keys that stayed in the C allocator's free lists
      while a drain ran, with no ingest to trigger ``Trimmer`` (bench/RESULTS.md run 68).
      ``malloc_trim`` takes 5-9 ms there, well under 1% of such a start.

    No collection first: after the imports one freed 0 to 5 objects for 27 to 44 ms, and
    would now walk the index too. Called by ``outpost run`` once the spool is open (Agent's
    ``on_spool_open``), before anything listens; an index rebuilt later, after a corrupt
    spool is salvaged, is walked again.
    """
    gc.freeze()
    if (trim := malloc_trim()) is not None:
        trim(0)


class Trimmer:
    """Calls ``malloc_trim`` (off the loop) once ingest has been quiet for a second after
    at least TRIM_AFTER_BYTES of bodies: a burst's memory goes back to the OS, and
    steady light traffic never pays for a trim."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._trim = malloc_trim()
        self._since = 0          # body bytes seen since the last trim started
        self._last = 0.0         # monotonic time of the last ingest activity
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Future[int] | None = None

    def activity(self, n: int) -> None:
        """``n`` body bytes arrived (taken or refused)."""
        self._since += n
        self._last = time.monotonic()

    def idle(self) -> None:
        """Nothing is in flight any more."""
        self._last = time.monotonic()
        self._arm(TRIM_QUIET_S)

    def _arm(self, delay: float) -> None:
        if (self._trim is None or self._timer is not None or self._running is not None
                or self._since < TRIM_AFTER_BYTES):
            return
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self.metrics.inflight_bytes:
            return  # busy again: the next idle() re-arms
        quiet = time.monotonic() - self._last
        if quiet < TRIM_QUIET_S:
            self._arm(TRIM_QUIET_S - quiet)
            return
        assert self._trim is not None
        self._since = 0
        # Off the loop: trimming a large heap walks every free chunk.
        self._running = asyncio.get_running_loop().run_in_executor(None, self._trim, 0)
        self._running.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future[int]) -> None:
        self._running = None
        if fut.cancelled():
            return
        if (exc := fut.exception()) is not None:
            log_limited(log, logging.WARNING, "trim", "malloc_trim failed: %s", exc)
            return
        self.metrics.memory_trims += 1
        if not self.metrics.inflight_bytes:
            self._arm(TRIM_QUIET_S)  # a burst that came and went during this trim

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
