"""Priority lanes: which events go first when a backlog exists (docs/operations.md).

An event is classified once, at ingest, where its family's accept function has it
parsed, and its lane is stored with it. High: Nucleus ``init`` and ``error`` and
their Segment equivalents ("Application Opened", "Application Error": docs/mapping.md
§8), plus what the operator names per upstream (``priority_types``,
``priority_events``). Everything else is normal. Rules only ever add to the high
lane: a Nucleus session's ``init`` is always high, so it goes before that session's
other events (FIFO within the high lane, and high before normal).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

HIGH = 0     # sorts first: a lane's number is its place in the send order
NORMAL = 1
LANES = (HIGH, NORMAL)
NAMES = {HIGH: "high", NORMAL: "normal"}


def readable(lane: int) -> int:
    """``lane``, or the normal lane for one no forwarder reads (damage garbled a stored
    lane): an event put there would wait, counted queued, until it expired."""
    return lane if lane in LANES else NORMAL

NUCLEUS_HIGH = frozenset({"init", "error"})
SEGMENT_HIGH = frozenset({"Application Opened", "Application Error"})


@dataclass(frozen=True, slots=True)
class Rule:
    """An upstream's own high classes: event types, and event names (a Nucleus event's
    ``name``, a Segment track's ``event``)."""

    types: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset()


NO_RULE = Rule()


class Ruled(Protocol):
    """What lanes read of an upstream's config (settings.UpstreamConfig): its keys and
    rules. A protocol, so that the spool, which imports this module, needs no config."""

    @property
    def keys(self) -> tuple[str, ...]: ...
    @property
    def priority_types(self) -> tuple[str, ...]: ...
    @property
    def priority_events(self) -> tuple[str, ...]: ...


class Lanes:
    """Classifies events by the rules of the upstream their key routes to.

    Routing is the config's (the first upstream whose keys match): keys named before
    the first ``"*"`` upstream are looked up, every other key takes that upstream's rule,
    so a lookup is one dict access however many keys apps invent.
    """

    __slots__ = ("_named", "_rest", "ruled")

    def __init__(self, upstreams: Iterable[Ruled] = ()) -> None:
        self._named: dict[str, Rule] = {}
        self._rest = NO_RULE
        for up in upstreams:
            rule = Rule(frozenset(up.priority_types), frozenset(up.priority_events))
            if "*" in up.keys:
                self._rest = rule
                break
            for key in up.keys:
                self._named.setdefault(key, rule)
        # False when no key has a rule (the usual config): an event's lane is then its
        # family's fixed classes alone, which the accept loops test without a call.
        self.ruled = self._rest != NO_RULE or any(r != NO_RULE for r in self._named.values())

    def rule(self, key: str) -> Rule:
        return self._named.get(key, self._rest)

    def nucleus(self, key: str, kind: str, name: str | None) -> int:
        """The lane of a checked Nucleus event of type ``kind`` and ``name``."""
        if kind in NUCLEUS_HIGH:
            return HIGH
        rule = self._named.get(key, self._rest)  # self.rule, without a call per event
        if rule is NO_RULE:
            return NORMAL
        if kind in rule.types or (name is not None and name in rule.events):
            return HIGH
        return NORMAL

    def segment(self, key: str, kind: str, name: str | None) -> int:
        """The lane of a checked Segment-family message of type ``kind``; ``name`` is a
        track's `event` (None for other types)."""
        if name in SEGMENT_HIGH:
            return HIGH
        rule = self._named.get(key, self._rest)  # self.rule, without a call per message
        if rule is NO_RULE:
            return NORMAL
        if kind in rule.types or (name is not None and name in rule.events):
            return HIGH
        return NORMAL

