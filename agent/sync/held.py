"""What a hold holds: the queued events of keys an upstream takes, in the held lanes.

Events of keys no upstream takes wait for a route, not for the network: counted
as held, or timed for ``max_hold_h``, they would release the hold every minute
for events no release can send.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from agent.families.lanes import LANES, NAMES
from agent.settings import Config
from agent.spool import Spool
from agent.spool.types import Stream


async def oldest_routed(cfg: Config, spool: Spool, lanes: Sequence[int] = LANES) -> int | None:
    """The receipt time of the oldest event of ``lanes`` an upstream takes; None if there
    is none."""
    if any("*" in up.keys for up in cfg.upstreams):
        return await spool.oldest_received(lanes)   # every key is routed: the heads
    # Only keys named in the config are routed: a handful of heads, one read each.
    oldest: int | None = None
    for key, stream in list(spool.streams.items()):
        if stream.depth and cfg.route(key) is not None:
            head = await spool.oldest_received(lanes, stream.id)
            if head is not None and (oldest is None or head < oldest):
                oldest = head
    return oldest


def held_by_lane(cfg: Config, streams: Iterable[Stream], lanes: Sequence[int]) -> dict[str, int]:
    """Events held back now in each lane (of ``lanes``, the held ones), of routed keys."""
    held = {NAMES[lane]: 0 for lane in LANES}
    for stream in streams:
        if stream.depth and cfg.route(stream.key) is not None:
            for lane in lanes:
                held[NAMES[lane]] += stream.queued((lane,))
    return held
