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
    """psutil's reading; None without a battery or where psutil cannot read one."""
    sensors = getattr(psutil, "sensors_battery", None)   # absent on some platforms
    try:
        raw = sensors() if sensors is not None else None
    except (OSError, RuntimeError):   # an unreadable /sys entry must not stop forwarding
        return None
    if raw is None:
        return None
    # power_plugged is None when the OS cannot tell: only a known "on battery" counts.
    return Battery(percent=float(raw.percent), plugged=raw.power_plugged is not False)
