"""The lifecycle events of both families (docs/mapping.md §8): the events that are, or
become, init and error events, which carry the device facts (§9). Apart from the
enrichment stage (enrich.py), which asks the mapping whether an event is a mapped one:
the mapping and the families' rules read these names too."""

from __future__ import annotations

NEEDS_FACTS = frozenset({"init", "error"})
OPENED = "Application Opened"   # Segment's lifecycle event, Nucleus' `init`
ERROR = "Application Error"     # Segment's name for what Nucleus calls `error`
SEGMENT_NEEDS_FACTS = frozenset({OPENED, ERROR})
