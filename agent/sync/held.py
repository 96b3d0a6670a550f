"""What a hold holds: the queued events of keys an upstream takes.

Events of keys no upstream takes wait for a route, not for the network: counted
as held, or timed for ``max_hold_h``, they would release the hold every minute
for events no release can send.
"""

from __future__ import annotations

from agent.settings import Config
from agent.spool import Spool


async def oldest_routed(cfg: Config, spool: Spool) -> int | None:
    """The receipt time of the oldest event an upstream takes; None if there is none."""
    if any("*" in up.keys for up in cfg.upstreams):
        return await spool.oldest_received()   # every key is routed: one read of the heads
    # Only keys named in the config are routed: a handful of heads, one read each.
    oldest: int | None = None
    for key, stream in list(spool.streams.items()):
        if stream.depth and cfg.route(key) is not None:
            head = await spool.fetch(stream.id, 0, 1)
            if head and (oldest is None or head[0].received < oldest):
                oldest = head[0].received
    return oldest
