"""One vocabulary of what becomes of events: drop reasons and tallies, counted in one place.

As sentry-python's ``record_lost_event``: a closed set of names, each with its
meaning, and one function every count goes through. /status, /metrics, `outpost
status` and the status page list these enums, so a reason added here shows up
in all of them. The spool keeps the counts by name in its counters table: a
name, once released, never changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Drop(StrEnum):
    """Why events were lost or refused; ``help`` says when it happens."""

    help: str

    def __new__(cls, value: str, help_text: str) -> Drop:
        member = str.__new__(cls, value)
        member._value_ = value
        member.help = help_text
        return member

    DEAD_LETTERED = ("dead_lettered", "an upstream refused them for good; kept as dead "
                     "letters in the spool")
    EXPIRED = ("expired", "queued longer than storage.max_age_days")
    DROPPED_FULL = ("dropped_full", "deleted, oldest first, to make room at "
                    "storage.max_size_mb (when_full = \"drop_oldest\")")
    REJECTED_FULL = ("rejected_full", "refused at ingest: the spool was at storage.max_size_mb "
                     "(when_full = \"reject\"; with \"drop_oldest\", when only events on "
                     "their way upstream could make the room), or the request was bigger "
                     "than the whole spool")
    REJECTED_STORAGE_ERROR = ("rejected_storage_error", "refused at ingest: the spool could not "
                              "be written (disk full, I/O error)")
    DROPPED_CORRUPT = ("dropped_corrupt", "queued in a corrupt spool and not readable when it "
                       "was moved aside")


class Tally(StrEnum):
    """Counts that are not losses; each is exported as ``outpost_<metric>``."""

    metric: str
    help: str

    def __new__(cls, value: str, metric: str, help_text: str) -> Tally:
        member = str.__new__(cls, value)
        member._value_ = value
        member.metric = metric
        member.help = help_text
        return member

    INGESTED = ("ingested", "events_ingested_total", "New events committed to the spool.")
    DUPLICATES = ("duplicates", "events_duplicate_total",
                  "Resent events already stored: acknowledged again, stored once.")
    ACKED = ("acked", "events_acked_total",
             "Events deleted after an upstream acknowledged them.")
    # Per incident, not per event: the events lost with it are Drop.DROPPED_CORRUPT.
    SPOOL_CORRUPT = ("spool_corrupt", "spool_corrupt_total",
                     "Times a corrupt spool was moved aside.")
    # Per incident too: how many events the ignored commits held is unknown.
    WAL_DAMAGED = ("wal_damaged", "spool_wal_damaged_total",
                   "Times the spool's write-ahead log was found damaged at startup: SQLite "
                   "ignores the commits after the damage, and their events are lost.")
    # Keys of delivered events, not events.
    DEDUPE_FORGOTTEN = ("dedupe_forgotten", "dedupe_keys_forgotten_total",
                        "Dedupe keys forgotten early, to make room at storage.max_size_mb or "
                        "past storage.dedupe_max_keys, each once (a late resend of one may be "
                        "delivered again).")
    # Dead letters an operator acted on (`outpost dead retry` / `outpost dead purge`).
    DEAD_RETRIED = ("dead_retried", "dead_letters_retried_total",
                    "Dead letters sent back to their key's queue by `outpost dead retry`.")
    DEAD_PURGED = ("dead_purged", "dead_letters_purged_total",
                   "Dead letters deleted by `outpost dead purge`.")
    # Dead letters the spool let go of on its own (already counted once as dead_lettered).
    DEAD_DROPPED_FULL = ("dead_dropped_full", "dead_letters_dropped_full_total",
                         "Dead letters deleted, oldest first, to keep the spool within "
                         "storage.max_size_mb (before any queued event).")
    DEAD_EXPIRED = ("dead_expired", "dead_letters_expired_total",
                    "Dead letters deleted once kept longer than storage.max_age_days.")
    DEAD_DROPPED_CORRUPT = ("dead_dropped_corrupt", "dead_letters_dropped_corrupt_total",
                            "Dead letters in a corrupt spool that could not be read back, or "
                            "whose app key was lost with it, when it was moved aside.")


Outcome = Drop | Tally
Counts = dict[Outcome, int]

_BY_NAME: dict[str, Outcome] = {**{d.value: d for d in Drop}, **{t.value: t for t in Tally}}


# A count no device reaches, but damage can write (the spool keeps counts as SQLite's
# int64): counts stop there, or saving them overflows, and a salvage that failed so
# failed every start after it.
COUNT_MAX = (1 << 63) - 1


def record(counts: Counts, outcome: Outcome, n: int = 1) -> None:
    """The one place every outcome is counted: a commit's deltas, the spool's totals, a
    salvage's carried counts. A zero is not recorded: totals start from the enums."""
    if n:
        counts[outcome] = min(counts.get(outcome, 0) + n, COUNT_MAX)


def merge(into: Counts, deltas: Counts) -> None:
    for outcome, n in deltas.items():
        record(into, outcome, n)


def from_names(rows: Iterable[tuple[object, object]]) -> Counts:
    """Counts read back by name (the counters table). A name this version does not know
    (a newer agent's, after a downgrade) stays in the file but is not shown; a value
    that is not an integer (a damaged spool being salvaged) is skipped."""
    counts: Counts = {}
    for name, n in rows:
        outcome = _BY_NAME.get(name) if isinstance(name, str) else None
        if outcome is not None and isinstance(n, int):
            record(counts, outcome, n)
    return counts


def totals(counts: Counts) -> dict[str, int]:
    """Every tally and drop reason by name, 0 for those that never happened, sorted."""
    return {name: counts.get(outcome, 0) for name, outcome in sorted(_BY_NAME.items())}


def drops(counts: Counts) -> dict[str, int]:
    """Events lost or refused by reason, every reason (in the enum's order)."""
    return {reason.value: counts.get(reason, 0) for reason in Drop}
