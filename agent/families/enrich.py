"""The enrichment stage: device facts filled into the events that leave them out.

Only missing fields are filled: what the app sent always wins.
"""

from __future__ import annotations

from typing import Any

from agent.families.facts import DeviceFacts

NEEDS_FACTS = frozenset({"init", "error"})


class Enrich:
    """Fills device facts into events, with one method per family.

    Built once from the detected facts by the composition root (agent/service.py) and
    handed to the ingest side, which passes it to each family's accept function: that
    function applies it to every event it builds, the one place events of its family are
    made. Today only Nucleus init and error events are filled; a family with facts of
    its own to fill gets a method here.
    """

    __slots__ = ("facts",)

    def __init__(self, facts: DeviceFacts) -> None:
        self.facts = facts

    def nucleus(self, event: dict[str, Any], kind: str) -> None:
        """Add platform, osVersion, totalRam, language/locale, arch and machineId to an
        init or error event, where absent."""
        if kind not in NEEDS_FACTS:
            return
        facts = self.facts
        for name in ("platform", "osVersion", "totalRam", "arch"):
            if event.get(name) is None:
                event[name] = getattr(facts, name)
        # Current modules send `locale`, the doc asks for `language`: fill both,
        # preferring whichever of the two the app itself sent.
        lang = event.get("language") or event.get("locale") or facts.language
        for name in ("language", "locale"):
            if event.get(name) is None:
                event[name] = lang
        # Newer modules identify the device by deviceId instead of machineId.
        if event.get("machineId") is None and event.get("deviceId") is None:
            event["machineId"] = facts.machineId
