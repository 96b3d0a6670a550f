"""The battery, read through one seam: ``read_battery`` (psutil) or what a test injects.

psutil has no change notification on any OS, so the monitor polls this, and only
while a [sync] rule needs the battery (a slow poll: levels move by minutes).
"""

from __future__ import annotations

from collections.abc import Callable

import psutil

from agent.sync.policy import Battery

# Returns None where the machine has no battery (a desktop, a kiosk on mains).
BatterySensor = Callable[[], Battery | None]


def read_battery() -> Battery | None:
    """psutil's reading; None without a battery. A battery psutil cannot read (an
    unreadable /sys entry) raises: the monitor counts it as no battery, never low, and
    reports it (logged, counted, last_error), as a failed metered reading is."""
    sensors = getattr(psutil, "sensors_battery", None)   # absent on some platforms
    raw = sensors() if sensors is not None else None
    if raw is None:
        return None
    # power_plugged is None when the OS cannot tell: only a known "on battery" counts.
    return Battery(percent=float(raw.percent), plugged=raw.power_plugged is not False)
