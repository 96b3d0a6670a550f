"""The transmit profile as a pure function of the [sync] rules and what was detected.

No I/O here (an import-linter contract keeps psutil and D-Bus out), so every
combination of network, battery and rules is testable as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from agent.settings import SyncConfig

NORMAL = "normal"
HOLD = "hold"


class Metered(Enum):
    """The network's cost as a source reports it; UNKNOWN counts as not metered."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class MeteredReading:
    """A metered-network source's latest answer, and where it came from (or why none)."""

    state: Metered
    detail: str


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


def decide(cfg: SyncConfig, metered: MeteredReading, battery: Battery | None) -> Profile:
    """The strictest rule that applies; "normal" when none does."""
    active: list[str] = []
    if cfg.on_metered == HOLD and metered.state is Metered.YES:
        active.append("metered network")
    if cfg.on_low_battery == HOLD and low_battery(cfg, battery):
        assert battery is not None
        active.append(f"battery {battery.percent:.0f}%")
    if active:
        return Profile(HOLD, ", ".join(active))
    return Profile(NORMAL, _why_normal(cfg, metered, battery))


def low_battery(cfg: SyncConfig, battery: Battery | None) -> bool:
    """On battery (not mains) below the configured level; no battery is never low."""
    return battery is not None and not battery.plugged and battery.percent < cfg.low_battery_pct


def _why_normal(cfg: SyncConfig, metered: MeteredReading, battery: Battery | None) -> str:
    if cfg.on_metered == NORMAL and cfg.on_low_battery == NORMAL:
        return "no [sync] rule set"
    if cfg.on_metered != NORMAL and metered.state is Metered.UNKNOWN:
        return "metered unknown: treated as not metered"
    return "no rule applies"
