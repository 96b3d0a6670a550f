"""Where large bodies are parsed: on one worker thread, so the event loop keeps serving.

Parsing and validating a 4 MiB Nucleus post (38,000 events) or Segment batch, or a
1 MiB hand-written one (the lenient parser is pure Python), takes from a tenth of a
second to a second or more; on the loop, every other request, /healthz included,
waited for it. On a worker thread the loop still gets the GIL every switch
interval (5 ms), so it keeps answering. One worker, not more: parsing holds the
GIL, so more threads would not parse faster, and one at a time bounds the
parsed trees in memory to one. Small bodies are parsed inline: a thread hop
would cost more than parsing them.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

INLINE_MAX = 64 * 1024  # bytes; orjson parses this in well under a millisecond
SWITCH_INTERVAL_S = 0.0002
_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-parse")


async def parse(size: int, work: Callable[[], T]) -> T:
    """``work()``, for a body of ``size`` bytes: inline when small, else on the worker.

    ``work`` must touch nothing the loop changes: it parses and validates only.
    """
    if size <= INLINE_MAX:
        return work()
    return await on_worker(work)


async def on_worker(work: Callable[[], T]) -> T:
    """``work()`` on the worker, as ``parse`` runs a large body's (the same rule)."""
    return await asyncio.get_running_loop().run_in_executor(_worker, _without_gc, work)


def _without_gc(work: Callable[[], T]) -> T:
    # A large body becomes 100,000 or more dicts and lists, all freed by reference
    # counting; the cyclic collector walking them meanwhile (a full collection took
    # 20 to 95 ms, holding the GIL) only stalled the loop.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return work()
    finally:
        if was_enabled:
            gc.enable()


def favour_the_loop() -> None:
    """Hand the GIL over every 0.2 ms instead of every 5 (Python's default).

    While the worker parses, the event loop thread waits for the GIL after every
    poll, up to one switch interval each time, and a request needs several polls.
    Measured with `python -m bench.large` (8 concurrent 4 MiB Nucleus posts),
    /healthz p99 went from 68-73 ms to 47-54 ms at 1 ms. The spool's writer thread
    waits so too, for each statement and compress of a commit while the loop parses:
    at 0.2 ms, /healthz p99 under the largest Nucleus posts fell again (~100 to
    ~50 ms) and 100-event websocket frames went ~10% faster, the batch rows and single
    calls unchanged (bench/RESULTS.md). Called by ``outpost run``.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_S)
