"""The newest dead-letter reasons on /status: read once, kept until the dead letters change.

The spool keeps its dead letters summarised as they come and go (agent/spool/schema.py
``DEAD_SUMMARY``): the newest groups are a few rows, however many letters there are
(grouping every letter again, as it once did, took 2.5 s for 700k of them). They are
still read on the reader thread the forwarders read their batches on, so not at every
poll: the books count every change to the dead letters (dead-lettered, retried, purged,
dropped for room, expired), and the groups are read again only when those counts moved,
once however many polls ask meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from agent.logs import redact
from agent.outcomes import Drop, Outcome, Tally
from agent.spool import Spool, dead, dead_live

# The counters any change to the dead letters moves.
_CHANGES: tuple[Outcome, ...] = (Drop.DEAD_LETTERED, Tally.DEAD_RETRIED, Tally.DEAD_PURGED,
                                 Tally.DEAD_DROPPED_FULL, Tally.DEAD_EXPIRED,
                                 Tally.DEAD_DROPPED_CORRUPT)
Groups = list[dict[str, Any]]


def redacted(groups: Groups) -> Groups:
    """Reasons are an upstream's own words, which may echo a key from the request: /status
    is readable by allowed web origins, so they pass the log's redaction first."""
    return [{**g, "reason": redact(g["reason"])} for g in groups]


class NewestReasons:
    """The newest (reason, upstream) groups of one running agent's dead letters."""

    def __init__(self) -> None:
        self._seen: tuple[int, ...] | None = None
        self._groups: Groups = []
        self._running: asyncio.Future[Groups] | None = None
        # Why the last reading failed (the groups are then the last read, stale), or None.
        self.error: str | None = None

    async def get(self, spool: Spool) -> Groups:
        """Redacted groups; the last ones if the spool cannot be read (status still
        answers, with the count the books keep, and ``error`` says why)."""
        seen = (spool.dead_count, *(spool.counters.get(c, 0) for c in _CHANGES))
        if seen == self._seen:
            return self._groups
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._summarise(spool, seen))
        # Shielded: one poll leaving must not cancel the summary the others wait for.
        return await asyncio.shield(self._running)

    async def _summarise(self, spool: Spool, seen: tuple[int, ...]) -> Groups:
        # Counts read before the summary: a change committed meanwhile moves them again,
        # so the next poll summarises again rather than keep a summary without it.
        try:
            got = await dead_live.read(spool, dead.newest_groups, dead.NEWEST_REASONS)
        except (dead.DeadError, sqlite3.Error) as exc:
            # A spool closed or failing: not kept, tried next time.
            self.error = str(exc) or type(exc).__name__
            return self._groups
        self._seen, self._groups, self.error = seen, redacted(got), None
        return self._groups
