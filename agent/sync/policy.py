"""The transmit profile as a pure function of the [sync] rules and what was detected.

No I/O here (an import-linter contract keeps psutil and D-Bus out), so every
combination of network, battery and rules is testable as plain values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from agent.families.lanes import HIGH, LANES
from agent.families.lanes import NORMAL as NORMAL_LANE
from agent.settings import SyncConfig

NORMAL = "normal"
PRIORITY_ONLY = "priority_only"   # only the high lane (agent/families/lanes.py) is sent
HOLD = "hold"
STRICTNESS = (NORMAL, PRIORITY_ONLY, HOLD)


class Metered(Enum):
    """The network's cost as a source reports it; UNKNOWN counts as not metered."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class MeteredReading:
    """A metered-network source's latest answer, and where it came from (or why none);
    ``failed``: the source could not read (no bus, a timeout, an odd value), an error."""

    state: Metered
    detail: str
    failed: bool = False


@dataclass(frozen=True)
class Battery:
    """One reading of the power state: ``percent`` charged, on mains or not."""

    percent: float
    plugged: bool


@dataclass(frozen=True)
class Profile:
    """What forwarding does now (``mode``) and why, in words status can show."""

    mode: str
    reason: str


def percent_shown(battery: Battery) -> str:
    """The battery's level for people, cut, not rounded: 19.6% (psutil reads Linux's
    counters unrounded) under a rule for below 20% shown as "20%" would read as a hold
    at the level itself."""
    return f"{math.floor(battery.percent)}%"


def decide(cfg: SyncConfig, metered: MeteredReading, battery: Battery | None) -> Profile:
    """The strictest rule that applies, naming every rule that does; "normal" when none
    does."""
    active: list[tuple[str, str]] = []   # (mode, why)
    if cfg.on_metered != NORMAL and metered.state is Metered.YES:
        active.append((cfg.on_metered, "metered network"))
    if cfg.on_low_battery != NORMAL and low_battery(cfg, battery):
        assert battery is not None
        active.append((cfg.on_low_battery, f"battery {percent_shown(battery)}"))
    if active:
        mode = max((m for m, _ in active), key=STRICTNESS.index)
        return Profile(mode, ", ".join(why for _, why in active))
    return Profile(NORMAL, _why_normal(cfg, metered, battery))


def sent_lanes(mode: str) -> tuple[int, ...]:
    """The lanes a profile's ``mode`` lets go."""
    return LANES if mode == NORMAL else (HIGH,) if mode == PRIORITY_ONLY else ()


def held_lanes(mode: str) -> tuple[int, ...]:
    """The lanes a profile's ``mode`` holds back."""
    return LANES if mode == HOLD else (NORMAL_LANE,) if mode == PRIORITY_ONLY else ()


def low_battery(cfg: SyncConfig, battery: Battery | None) -> bool:
    """On battery (not mains) below the configured level; no battery is never low."""
    return battery is not None and not battery.plugged and battery.percent < cfg.low_battery_pct


def _why_normal(cfg: SyncConfig, metered: MeteredReading, battery: Battery | None) -> str:
    if cfg.on_metered == NORMAL and cfg.on_low_battery == NORMAL:
        return "no [sync] rule set"
    if cfg.on_metered != NORMAL and metered.state is Metered.UNKNOWN:
        return "metered unknown: treated as not metered"
    return "no rule applies"
