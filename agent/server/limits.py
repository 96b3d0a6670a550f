"""What each key's upstream can carry: an event it never could is refused at ingest, with
the app's own API's "too large" reply, instead of being accepted and dead-lettered at
its first send (docs/mapping.md, §5). And the shape each key's events are stored in: an
event routed to an upstream of the other family is mapped here, once, and stored mapped,
so the drain sends stored bytes (docs/architecture.md, "Where mapping happens")."""

from __future__ import annotations

import sys
from collections.abc import Callable, Container, Sequence
from functools import partial
from typing import Any, NamedTuple

import orjson

from agent.families import mapping
from agent.families.event import (
    NOT_READ,
    NUCLEUS,
    SEGMENT,
    Columns,
    Event,
    Limit,
    compact_json,
    keys_of,
    now_ms,
)
from agent.families.nucleus import ID_TYPES
from agent.settings import Config, UpstreamConfig

# What mapping to the other family may add besides copies of the event's own values.
MAPPING_GROWTH_BYTES = 1024


class _Route(NamedTuple):
    """The upstream a key is routed to: its name, its limit, its family (None: unknown),
    and why a key could never be sent there (None: any can)."""

    name: str
    limit: Limit | None
    family: int | None
    refuses: Callable[[str], str | None] | None = None


# An upstream's rule on the app keys it can be sent (uplinks' ``key_rule``): None for any.
KeyRuleOf = Callable[[UpstreamConfig], Callable[[str], str | None] | None]
# Keys remembered with their route; local keys are few, but nothing bounds them when
# accept_keys is empty, so the memo is emptied when full. A key longer than any real
# one (a write key or app id is a few dozen characters; a path's may be 64 KiB) is
# routed afresh each time (a few µs): 4096 of those held 256 MiB.
_MAX_KEYS = 4096
_MAX_KEY_KEPT = 256


class RouteLimits:
    """The limit of the upstream each key is routed to (the first `[[upstream]]` whose
    `keys` match it), and that upstream's family, built from one Config; a reload builds
    a new one.

    A key routed nowhere has no limit: its events wait for the upstream a reload may
    route them to, which cannot be known yet, and are stored in their own family.
    """

    def __init__(self, cfg: Config, limit_of: Callable[[UpstreamConfig], Limit | None],
                 family_of: Callable[[UpstreamConfig], int] | None = None,
                 key_rule_of: KeyRuleOf | None = None, machine: str | None = None) -> None:
        self._cfg = cfg
        # The mapping each stored family goes through to reach an upstream of the other
        # one; ``machine``, the device's id, is a mapped Segment event's machineId when it
        # names no device of its own.
        self._mapped: dict[int, Callable[[dict[str, Any], int], dict[str, Any]]] = {
            NUCLEUS: mapping.nucleus_to_segment,
            SEGMENT: partial(mapping.segment_to_nucleus, machine=machine),
        }
        # Upstream names are unique (config.py): each route's limit and family by name.
        self._routes = {up.name: _Route(up.name, limit_of(up),
                                        None if family_of is None else family_of(up),
                                        None if key_rule_of is None else key_rule_of(up))
                        for up in cfg.upstreams}
        # False when every upstream can be sent any key: no key is asked about.
        self._rules = any(r.refuses is not None for r in self._routes.values())
        # False when no upstream sets a limit: the usual case costs nothing per event.
        self.active = any(r.limit is not None for r in self._routes.values())
        # No event this long or shorter is too large for any route (see oversize): a
        # message no longer is not measured event by event. Every Nucleus upstream sets
        # a limit (a 4 MiB message), far above nearly every message.
        self.least = min(((r.limit.max_bytes - r.limit.id_bytes - MAPPING_GROWTH_BYTES) // 3
                          for r in self._routes.values() if r.limit is not None),
                         default=sys.maxsize)
        # False when no upstream's family is known: nothing is mapped at ingest.
        self.maps = any(r.family is not None for r in self._routes.values())
        self._by_key: dict[str, _Route | None] = {}
        # The keys an upstream names (`keys`, "*" aside): the operator's apps, as many as
        # the config holds, never counted among those apps invent (listen.max_keys).
        self.named = frozenset(key for up in cfg.upstreams for key in up.keys if key != "*")

    def _route(self, key: str) -> _Route | None:
        try:
            return self._by_key[key]
        except KeyError:
            pass
        up = self._cfg.route(key)   # the one routing rule
        found = None if up is None else self._routes[up.name]
        if len(key) > _MAX_KEY_KEPT:
            return found
        if len(self._by_key) >= _MAX_KEYS:
            self._by_key.clear()
        self._by_key[key] = found
        return found

    def key_refusal(self, key: str) -> str | None:
        """Why the upstream ``key`` is routed to could never be sent its events under
        ``key`` (a Basic auth username holds no ':'), or None."""
        if not self._rules:
            return None
        route = self._route(key)
        return None if route is None or route.refuses is None else route.refuses(key)

    def maps_key(self, key: str) -> bool:
        """Whether ``key``'s Nucleus events are stored mapped to Segment."""
        if not self.maps:
            return False
        route = self._route(key)
        return route is not None and route.family == SEGMENT

    def maps_any(self, events: Sequence[Event]) -> bool:
        """Whether ``as_stored`` maps any of ``events`` (resends aside): one is routed to an
        upstream of the other family. A request's events share one key and one family,
        but for a Segment batch naming several keys: each key asked once."""
        if not self.maps:
            return False
        families = {events.family} if type(events) is Columns else {
            ev.family for ev in events}
        for key in keys_of(events):
            route = self._route(key)
            if route is not None and route.family is not None and families != {route.family}:
                return True
        return False

    def as_stored(self, events: Sequence[Event], known: Container[int] = (),
                  alike: bool = False) -> Sequence[Event]:
        """``events`` in the shape they are stored in: an event whose key is routed to an
        upstream of the other family mapped to that family, the rest as they are. An
        event whose dedupe key is ``known`` is a resend the spool will not store again:
        it is not mapped (Nucleus modules resend their whole unacknowledged queue every
        few seconds, so while the upstream is away most of what they post is resends).

        Mapped here, the drain sends the stored bytes as it sends events of the
        upstream's own family, and pays no mapping (6-22 µs an event on the loop, at the
        drain's pace); the mapping is a pure function of the event and its receive time,
        so the upstream gets what mapping at send time would give it (its `receivedAt`
        a few ms earlier: the time of the request, not of its commit). A Segment event
        mapped to Nucleus has no `id` yet: the uplink gives it its spool seq, as it
        gives any Nucleus event without one. A reload that routes the key to an upstream
        of the event's first family maps the stored events back: the mapping gives the
        original event back (docs/mapping.md, §7).

        The event as ingest parsed it (Event.parsed), when kept, is mapped instead of its
        body parsed again (~10k instructions an event), and dropped: held to the commit,
        the parsed events would be most of a large message's memory.

        ``alike``: every event has the first one's key and family. When that key's route
        maps nothing of that family, the events are returned with no loop over them (a
        Nucleus key's events are kept parsed only when its route maps them: nothing to drop).
        """
        if not self.maps:
            return events
        if alike:
            route = self._route(events[0].key)
            if route is None or route.family is None or route.family == events[0].family:
                return events
        if not isinstance(events, list):
            events = list(events)   # Columns: each Event made once
        out: list[Event] | None = None   # a copy, once an event is mapped
        received = None
        key = route = None   # a request's events share one key: its route looked up once
        for i, ev in enumerate(events):
            parsed, ev.parsed = ev.parsed, None
            if ev.key != key:
                key, route = ev.key, self._route(ev.key)
            if (route is None or route.family is None or route.family == ev.family
                    or ev.dedupe in known):
                continue
            received = received or now_ms()
            try:
                mapped = self._mapped[ev.family](
                    orjson.loads(ev.body) if parsed is None else parsed, received)
                body = compact_json(mapped)
            except (ValueError, TypeError):
                # Not mappable: ingest refuses what nests too deep to be (families/depth.py),
                # so nothing known; stored as it came, it would be dead-lettered at send.
                continue
            if route.family == SEGMENT:
                ack_id = NOT_READ
            else:   # the id a Nucleus event given back from its Segment form had, if any
                ack_id = mapped.get("id")
                if ack_id is not None and type(ack_id) not in ID_TYPES:
                    continue   # left to the uplink's take loop, which decides (as before)
            if out is None:
                out = list(events)
            out[i] = Event(ev.key, route.family, ev.dedupe, body, ack_id, ev.lane)
        return events if out is None else out

    def oversize(self, event: Event) -> str | None:
        """Why ``event`` can never be delivered on its route, or None when it can."""
        route = self._route(event.key) if self.active else None
        if route is None or route.limit is None:
            return None
        name, limit = route.name, route.limit
        size = len(event.body)
        ack_id = event.ack_id
        if event.family != limit.family:
            # Mapping copies no value more than three times (a device id: anonymousId,
            # context.device.id, context.nucleus) and adds at most MAPPING_GROWTH_BYTES
            # (the property tests of the mapping hold it to that): only a larger event
            # can map past the limit, so only those are mapped to be measured.
            if 3 * size + MAPPING_GROWTH_BYTES + limit.id_bytes <= limit.max_bytes:
                return None
            try:
                mapped = self._mapped[event.family](orjson.loads(event.body), now_ms())
                size = len(orjson.dumps(mapped))
            except (ValueError, TypeError) as exc:   # not mappable (see as_stored)
                return f"event cannot be sent to upstream {name!r}: it does not map ({exc})"
            ack_id = mapped.get("id")
        if limit.id_bytes and size + limit.id_bytes > limit.max_bytes:
            # Sent with the id its uplink gives it when it has none: measured so.
            if ack_id is NOT_READ:
                ack_id = orjson.loads(event.body).get("id")
            if ack_id is None:
                size += limit.id_bytes
        return limit.refuses(name, size)
