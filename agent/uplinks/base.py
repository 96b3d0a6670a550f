"""The contract between the forwarder and every upstream protocol.

Like OpenTelemetry exporters, uplinks *return* their outcome and do not raise
it: the forwarder alone decides about backoff, dead letters and acks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from agent.spool.types import Row

# Statuses worth retrying as they are (and any 5xx).
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# The batch itself is refused: split it to find the events at fault. Any other 4xx
# (401, 403, 404: a wrong key or URL) is the configuration's fault: back off, keep the events.
REJECTED_STATUSES = frozenset({400, 413, 422})


@dataclass
class SendResult:
    """What became of a batch."""

    acked: list[int] = field(default_factory=list)          # seqs the upstream confirmed
    failed: dict[int, str] = field(default_factory=dict)    # seq -> permanent rejection reason
    error: str | None = None                                # transport/server problem: back off
    retry_after: float | None = None                        # the upstream's own wait, seconds
    rejected: str | None = None   # the batch as a whole was refused (400/413): split it


def _ignore_crash(exc: BaseException) -> None:
    """``Uplink.on_crash`` until a forwarder supervises the uplink."""


class UplinkBase:
    """What every uplink shares: a default ``on_crash``, which the forwarder replaces."""

    # staticmethod: a plain function here would be bound to the instance when read.
    on_crash: Callable[[BaseException], None] = staticmethod(_ignore_crash)


class Uplink(Protocol):
    """One connection to one upstream, for one local key."""

    name: str
    # The forwarder sets this: an uplink hands it anything its own background tasks
    # (a websocket reader, say) raise unexpectedly, for the forwarder's supervisor.
    on_crash: Callable[[BaseException], None]

    def take(self, rows: list[Row]) -> list[Row]:
        """Reserve the longest prefix of ``rows`` that may go in the next batch.

        Called synchronously before ``send``; it may take fewer rows than given
        (size cap, or an id still unacknowledged on this connection).
        """
        ...

    async def send(self, batch: list[Row]) -> SendResult:
        """Deliver a batch that ``take`` returned; never raises for network trouble."""
        ...

    async def close(self) -> None:
        """End the connection, if any; a later ``send`` may open a new one.

        The forwarder calls it only with no batch in flight: after a failure, before
        sending again, so that no later batch can overtake an earlier one that failed.
        """
        ...
