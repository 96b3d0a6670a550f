"""The spool's public types: what forwarders read, and the "full" refusal."""

from __future__ import annotations

from dataclasses import dataclass

RETRY_AFTER_FULL_S = 30


class SpoolFull(Exception):
    """The spool cannot take these events now; the app should retry later."""

    def __init__(self, reason: str, retry_after: int = RETRY_AFTER_FULL_S) -> None:
        super().__init__(reason)
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


@dataclass(slots=True)
class Stream:
    """One key's queue: its id and in-memory depth counters (persisted per commit)."""

    id: int
    key: str
    depth: int = 0
    bytes: int = 0
