"""What each key's upstream can carry: an event it never could is refused at ingest, with
the app's own API's "too large" reply, instead of being accepted and dead-lettered at
its first send (docs/mapping.md, §5)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from agent.families import mapping
from agent.families.event import NUCLEUS, SEGMENT, Event, Limit, now_ms
from agent.settings import Config, UpstreamConfig

# The mapping each stored family goes through to reach an upstream of the other one.
# What mapping to the other family may add besides copies of the event's own values.
MAPPING_GROWTH_BYTES = 1024
_MAPPED: dict[int, Callable[[dict[str, Any], int], dict[str, Any]]] = {
    NUCLEUS: mapping.nucleus_to_segment,
    SEGMENT: mapping.segment_to_nucleus,
}
# Keys remembered with their route; local keys are few, but nothing bounds them when
# accept_keys is empty, so the memo is emptied when full.
_MAX_KEYS = 4096


class RouteLimits:
    """The limit of the upstream each key is routed to (the first `[[upstream]]` whose
    `keys` match it), built from one Config; a reload builds a new one.

    A key routed nowhere has no limit: its events wait for the upstream a reload may
    route them to, which cannot be known yet.
    """

    def __init__(self, cfg: Config, limit_of: Callable[[UpstreamConfig], Limit | None]) -> None:
        self._routes = [(up, limit_of(up)) for up in cfg.upstreams]
        # False when no upstream sets a limit: the usual case costs nothing per event.
        self.active = any(limit is not None for _, limit in self._routes)
        self._by_key: dict[str, tuple[str, Limit] | None] = {}

    def _route(self, key: str) -> tuple[str, Limit] | None:
        try:
            return self._by_key[key]
        except KeyError:
            pass
        found = None
        for up, limit in self._routes:
            if up.matches(key):
                found = None if limit is None else (up.name, limit)
                break
        if len(self._by_key) >= _MAX_KEYS:
            self._by_key.clear()
        self._by_key[key] = found
        return found

    def oversize(self, event: Event) -> str | None:
        """Why ``event`` can never be delivered on its route, or None when it can."""
        route = self._route(event.key) if self.active else None
        if route is None:
            return None
        name, limit = route
        size = len(event.body)
        if event.family != limit.family:
            # Mapping copies no value more than three times (a device id: anonymousId,
            # context.device.id, context.nucleus) and adds at most MAPPING_GROWTH_BYTES
            # (the property tests of the mapping hold it to that): only a larger event
            # can map past the limit, so only those are mapped to be measured.
            if 3 * size + MAPPING_GROWTH_BYTES <= limit.max_bytes:
                return None
            size = len(orjson.dumps(_MAPPED[event.family](orjson.loads(event.body), now_ms())))
        if size <= limit.max_bytes:
            return None
        # The limit first: a websocket close carries only 123 bytes of reason.
        return (f"event too large for upstream {name!r} ({limit.source}): {size} bytes, "
                f"{limit.max_bytes} fit")
