"""The device facts that init and error events carry (agent/device.py detects them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceFacts:
    """The facts filled into events that leave them out."""

    platform: str
    osVersion: str
    totalRam: float
    language: str
    arch: str
    machineId: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
