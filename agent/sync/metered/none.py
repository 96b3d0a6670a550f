"""The source of a platform Outpost cannot ask yet: one "unknown" reading, and why."""

from __future__ import annotations

from collections.abc import Callable

from agent.sync.policy import Metered, MeteredReading


class NoSource:
    """Reports ``why`` once as an unknown cost (treated as not metered)."""

    def __init__(self, why: str) -> None:
        self.why = why

    async def watch(self, report: Callable[[MeteredReading], None]) -> None:
        report(MeteredReading(Metered.UNKNOWN, self.why))
