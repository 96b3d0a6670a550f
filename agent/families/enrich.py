"""Fill the device facts that init and error events must carry.

Only missing fields are filled: what the app sent always wins.
"""

from __future__ import annotations

from typing import Any

from agent.families.facts import DeviceFacts

NEEDS_FACTS = frozenset({"init", "error"})


def fill_nucleus(event: dict[str, Any], facts: DeviceFacts, kind: str) -> None:
    """Add platform, osVersion, totalRam, language/locale, arch and machineId if absent."""
    if kind not in NEEDS_FACTS:
        return
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

