"""What a hold holds: the queued events of keys an upstream takes, in the held lanes.

Events of keys no upstream takes wait for a route, not for the network: counted
as held, or timed for ``max_hold_h``, they would release the hold every minute
for events no release can send.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence

from agent.clock import age_s
from agent.families.lanes import LANES, NAMES
from agent.settings import Config
from agent.spool import Spool
from agent.spool.types import Stream


async def oldest_routed(cfg: Config, spool: Spool, lanes: Sequence[int] = LANES) -> int | None:
    """The receipt time of the oldest event of ``lanes`` an upstream takes; None if there
    is none."""
    return await _least(cfg, spool, lanes, spool.oldest_received)


async def held_age_s(cfg: Config, spool: Spool, lanes: Sequence[int] = LANES) -> float | None:
    """How long the oldest event of ``lanes`` an upstream takes has waited, in seconds, by
    the wall clock or by the time the agent saw pass, whichever says longer: a clock set
    back after the events arrived must not hold them for good. None if there is none."""
    received = await oldest_routed(cfg, spool, lanes)
    if received is None:
        return None
    seq = await _least(cfg, spool, lanes, spool.oldest_seq)
    observed = spool.observed_age_ms(seq) if seq is not None else None
    return max(age_s(received), (observed or 0) / 1000)


async def _least(cfg: Config, spool: Spool, lanes: Sequence[int],
                 read: Callable[[Sequence[int], int | None], Awaitable[int | None]]
                 ) -> int | None:
    """The least of ``read``'s answers for the heads of the routed keys."""
    if any("*" in up.keys for up in cfg.upstreams):
        return await read(lanes, None)   # every key is routed: the heads
    # Only keys named in the config are routed: a handful of heads, one read each.
    least: int | None = None
    for key, stream in list(spool.streams.items()):
        if stream.depth and cfg.route(key) is not None:
            head = await read(lanes, stream.id)
            if head is not None and (least is None or head < least):
                least = head
    return least


def held_by_lane(cfg: Config, streams: Iterable[Stream], lanes: Sequence[int]) -> dict[str, int]:
    """Events held back now in each lane (of ``lanes``, the held ones), of routed keys."""
    held = {NAMES[lane]: 0 for lane in LANES}
    for stream in streams:
        if stream.depth and cfg.route(stream.key) is not None:
            for lane in lanes:
                held[NAMES[lane]] += stream.queued((lane,))
    return held
