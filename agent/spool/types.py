"""The spool's public types: what forwarders read, and the one refusal, SpoolFull."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from agent.families.lanes import HIGH, NORMAL

RETRY_AFTER_FULL_S = 30


class Reason(Enum):
    """Why the spool refused events; each with the message apps and logs see by default."""

    FULL = "spool is full (storage.max_size_mb)"
    SHUTTING_DOWN = "agent is shutting down"
    NOT_OPEN = "spool is not open"
    DISK_ERROR = "disk full"
    CORRUPT = "spool storage is failing"


class SpoolFull(Exception):
    """The spool cannot take these events now; the app should retry later.

    ``reason`` says why; ``str()`` is the message (a disk error carries SQLite's own).
    """

    def __init__(self, reason: Reason, retry_after: int = RETRY_AFTER_FULL_S,
                 message: str | None = None) -> None:
        super().__init__(message or reason.value)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(slots=True)
class Row:
    """One stored event as a forwarder sees it."""

    seq: int
    stream: int
    family: int
    received: int
    body: bytes
    lane: int = NORMAL   # families/lanes.py


@dataclass(slots=True)
class Stream:
    """One key's queue: its id and in-memory depth counters (persisted per commit;
    ``high``, the high lane's share of ``depth``, is counted from the records at start)."""

    id: int
    key: str
    depth: int = 0
    bytes: int = 0
    high: int = 0

    def queued(self, lanes: Iterable[int]) -> int:
        """Events queued in ``lanes``."""
        return sum(self.high if lane == HIGH else self.depth - self.high for lane in lanes)
