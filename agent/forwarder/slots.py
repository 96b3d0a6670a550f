"""Batches in flight to one upstream, from all its keys' loops together: taken in turn.

A batch in flight holds its rows and its request body (up to ``batch_max_bytes``). With
``accept_keys = []`` any local process can invent keys, and every key with a queue read
a batch and held it while it waited for the upstream (or for a connection): memory grew
with the number of keys. A loop takes a slot before it reads rows for a batch and gives
it back when the batch is answered. Slots go in the order loops asked (no key waits
behind a busy one for more than its turn); a loop's further batches (websocket
pipelining) take only slots that nobody waits for.
"""

from __future__ import annotations

import asyncio
from collections import deque

# Per upstream. 16 held 200 keys' drain to 83 MB of RSS against 251 MB unbounded, but
# queued 8,000 keys waiting out an outage so long that each cost ~300 B more RSS (loops
# alive longer, the heap fragmented: 1.7-2.1 KB a key against 1.4-1.5); 64 kept that cost
# (1.2-1.7 KB) and held the drain to 130 MB. At most 64 batches of batch_max_bytes
# (500 KB): far more than one key's drain needs (segment-http one batch at a time,
# nucleus-ws max_in_flight 4).
BATCHES_IN_FLIGHT = 64


class Slots:
    def __init__(self, size: int = BATCHES_IN_FLIGHT) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take(self, most: int) -> int:
        """Up to ``most`` slots at once, none while others wait; how many were taken."""
        if self._waiters:
            return 0
        n = min(most, self.free)
        self.free -= n
        return n

    def wait(self) -> asyncio.Future[None]:
        """A slot, when one is given back (the future's result); cancel it to stop
        waiting (a slot given to a future cancelled after is still the caller's: see
        ``StreamForwarder``)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    def give(self, n: int = 1) -> None:
        self.free += n
        while self.free and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self.free -= 1
