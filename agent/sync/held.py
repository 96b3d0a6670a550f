"""What a hold holds: the queued events of keys an upstream takes, in the held lanes.

Events of keys no upstream takes wait for a route, not for the network: counted
as held, or timed for ``max_hold_h``, they would release the hold every minute
for events no release can send.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

from agent.clock import age_s
from agent.families.lanes import LANES, NAMES
from agent.settings import Config
from agent.spool import Spool
from agent.spool.types import Totals


async def oldest_routed(cfg: Config, spool: Spool, lanes: Sequence[int] = LANES,
                        after: int = 0) -> int | None:
    """The receipt time of the oldest event of ``lanes`` an upstream takes, of those after
    seq ``after``; None if there is none."""
    return await _least(cfg, spool, lanes, after, spool.oldest_received)


async def held_age_s(cfg: Config, spool: Spool, lanes: Sequence[int] = LANES,
                     after: int = 0) -> float | None:
    """How long the oldest event of ``lanes`` an upstream takes (of those after seq
    ``after``: a release's own are on their way) has waited, in seconds, by the wall clock
    or by the time the agent saw pass, whichever says longer: a clock set back after the
    events arrived must not hold them for good. None if there is none."""
    received = await oldest_routed(cfg, spool, lanes, after)
    if received is None:
        return None
    seq = await _least(cfg, spool, lanes, after, spool.oldest_seq)
    observed = spool.observed_age_ms(seq) if seq is not None else None
    return max(age_s(received), (observed or 0) / 1000)


async def _least(cfg: Config, spool: Spool, lanes: Sequence[int], after: int,
                 read: Callable[[Sequence[int], int | None, int], Awaitable[int | None]]
                 ) -> int | None:
    """The least of ``read``'s answers for the heads of the routed keys."""
    if any("*" in up.keys for up in cfg.upstreams):
        return await read(lanes, None, after)   # every key is routed: the heads
    # Only keys named in the config are routed: a handful of heads, one read each (the
    # config's keys, not the spool's: those can be any number).
    least: int | None = None
    for key in dict.fromkeys(key for up in cfg.upstreams for key in up.keys):
        stream = spool.streams.get(key)
        if stream is not None and stream.depth:
            head = await read(lanes, stream.id, after)
            if head is not None and (least is None or head < least):
                least = head
    return least


def held_by_lane(groups: Mapping[str | None, Totals], lanes: Sequence[int]) -> dict[str, int]:
    """Events held back now in each lane (of ``lanes``, the held ones), of routed keys:
    from the queues summed per upstream (``groups``, by upstream name; None for the keys
    no upstream takes), whatever the number of keys."""
    held = {NAMES[lane]: 0 for lane in LANES}
    for upstream, totals in groups.items():
        if upstream is not None:
            for lane in lanes:
                held[NAMES[lane]] += totals.queued((lane,))
    return held
