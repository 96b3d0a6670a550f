"""Whether the network is metered, one source per platform behind one small interface.

Linux asks NetworkManager over D-Bus (``networkmanager.py``). Windows' connection
cost API and macOS' path ``isExpensive`` are not wired: there the source reports
"unknown", which the policy treats as not metered, and status and doctor say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from typing import Protocol

from agent.settings import SyncConfig
from agent.sync.metered.networkmanager import NetworkManagerSource
from agent.sync.metered.none import NoSource
from agent.sync.policy import Metered, MeteredReading

Report = Callable[[MeteredReading], None]


class MeteredSource(Protocol):
    """Reports each new reading; ``watch`` runs until cancelled (or returns, if the
    platform has nothing to watch)."""

    async def watch(self, report: Report) -> None: ...


def source_for(cfg: SyncConfig, platform: str = sys.platform) -> MeteredSource:
    """The platform's source: NetworkManager on Linux, "unknown" elsewhere."""
    if platform.startswith("linux"):
        return NetworkManagerSource(cfg.dbus_address)
    names = {"darwin": "macOS (path isExpensive)", "win32": "Windows (connection cost API)"}
    return NoSource(f"no metered-network source on {names.get(platform, platform)} yet")


async def read_once(source: MeteredSource, timeout: float) -> MeteredReading:
    """The source's first reading (for `outpost doctor`); unknown if none comes in time."""
    first: asyncio.Future[MeteredReading] = asyncio.get_running_loop().create_future()

    def report(reading: MeteredReading) -> None:
        if not first.done():
            first.set_result(reading)
    watching = asyncio.ensure_future(source.watch(report))
    try:
        return await asyncio.wait_for(asyncio.shield(first), timeout)
    except asyncio.TimeoutError:
        return MeteredReading(Metered.UNKNOWN, f"no answer in {timeout:g}s")
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
