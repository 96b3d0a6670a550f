"""What the forwarders have sent and not yet settled: records the size cap and expiry leave.

An event sent and then acknowledged was delivered: dropped while its batch waited for the
answer (``when_full = "drop_oldest"``, ``max_age_days``), it was counted dropped and
delivered both, and its dedupe keys were let go, so the app's resend went out again.
Each forwarding loop holds its cursors here (per lane, the last seq it sent, 0 once it
sends from the start again): a key's records up to them hold events in flight, or acked
and not yet deleted, and stay until the loop settles them or ends. A crash loses the
leases with the batches they cover, and every record can go again.
"""

from __future__ import annotations

from agent.families.lanes import LANES

# (stream, lane, seq): a key's records of that lane from the first up to seq are leased.
Bound = tuple[int, int, int]


class Leases:
    """The running loops' cursors, by key; a key's next loop may start before the last
    one has ended (its acks still being deleted), so each key may hold more than one."""

    def __init__(self) -> None:
        self._held: dict[int, list[list[int]]] = {}

    def hold(self, stream: int, cursors: list[int]) -> None:
        """Lease what a loop sends from now on: ``cursors`` is its own list, read as it
        changes (it must change in place)."""
        self._held.setdefault(stream, []).append(cursors)

    def free(self, stream: int, cursors: list[int]) -> None:
        held = self._held.get(stream, [])
        for i, mine in enumerate(held):
            if mine is cursors:
                del held[i]
                break
        if not held:
            self._held.pop(stream, None)

    def bounds(self) -> list[Bound]:
        """Each key's leased records per lane, as of now."""
        return [(stream, lane, top) for stream, loops in self._held.items()
                for lane in LANES if (top := max(c[lane] for c in loops))]
