"""The enrichment stage: device facts filled into the events that are, or become, init
and error events, in the places of the family they are stored in (docs/mapping.md).

Only missing fields are filled: what the app sent always wins. A fact sent as JSON null
or "" is missing (the Nucleus API requires them on init and error: an empty string names
no locale, platform or machine; Electron gives "" for the locale before the app is ready). Events are enriched at
ingest, so an event forwarded as stored and one mapped to the other family carry the
same facts: the mapping moves each Segment place to its Nucleus place and back.

An event that another Outpost mapped from the other family (one forwarding to this one's
route of that family) is not filled again: it was enriched where it was first received,
and a fact added to it here would make it no longer the mapping of the app's event, which
then could not be given back (docs/mapping.md §7) but was mapped anew.
"""

from __future__ import annotations

from typing import Any

from agent.families import mapping
from agent.families.event import now_ms
from agent.families.facts import DeviceFacts
from agent.families.lanes import Lanes
from agent.families.lifecycle import ERROR, NEEDS_FACTS, OPENED, SEGMENT_NEEDS_FACTS

__all__ = ["ERROR", "NEEDS_FACTS", "OPENED", "SEGMENT_NEEDS_FACTS", "Enrich"]


class Enrich:
    """Fills device facts into events, with one method per family; ``lanes`` classifies
    them (priority lanes), at the same place.

    Built once from the detected facts by the composition root (agent/service.py) and
    handed to the ingest side, which passes it to each family's accept function: that
    function applies it to every event it builds, the one place events of its family are
    made.
    """

    __slots__ = ("facts", "lanes")

    def __init__(self, facts: DeviceFacts, lanes: Lanes | None = None) -> None:
        self.facts = facts
        self.lanes = lanes or Lanes()   # replaced on a reload (the upstreams' rules)

    def nucleus(self, event: dict[str, Any], kind: str) -> None:
        """Add platform, osVersion, totalRam, language/locale, arch and machineId to an
        init or error event, where absent (machineId: unless the event has a deviceId or
        an anonId)."""
        if kind not in NEEDS_FACTS:
            return
        payload = event.get("payload")
        if (isinstance(payload, dict) and isinstance(payload.get(mapping.SEGMENT_KEY), dict)
                and mapping.segment_given_back(event, now_ms()) is not None):
            return   # a Segment event mapped by another Outpost: enriched there
        facts = self.facts
        for name in ("platform", "osVersion", "totalRam", "arch"):
            if _missing(event.get(name)):
                event[name] = getattr(facts, name)
        # Current modules send `locale`, the doc asks for `language`: fill both,
        # preferring whichever of the two the app itself sent.
        lang = event.get("language") or event.get("locale") or facts.language
        for name in ("language", "locale"):
            if _missing(event.get(name)):
                event[name] = lang
        # Newer modules identify the device by deviceId instead of machineId; an app that
        # names its install by anonId alone has its events mapped to Segment under it
        # (mapping.py): the device's id would give its init another anonymousId.
        if (_missing(event.get("machineId")) and _missing(event.get("deviceId"))
                and not _is_id(event.get("anonId"))):
            event["machineId"] = facts.machineId

    def segment(self, event: dict[str, Any]) -> None:
        """Add `context.os.name`/`.version`, `context.locale` and `context.device.id`,
        `.totalRam`, `.arch` to a Segment track that becomes a Nucleus init or error
        ("Application Opened", "Application Error"), where absent.

        `context.device.id` is left out when the event has an `anonymousId`: the app's
        other events carry no device id, and mapped to Nucleus each one's `machineId` is
        its `anonymousId` (mapping.py); the device's id there made the init come from
        another machine than the rest of the app's events (as `machineId` is not filled
        beside a `deviceId`, above).

        An object the app sent as something else than an object (a string
        `context.os`, say) is left as it is: filling it would overwrite it.
        """
        if event.get("type") != "track" or event.get("event") not in SEGMENT_NEEDS_FACTS:
            return
        ctx = event.get("context")
        if ctx is not None and not isinstance(ctx, dict):
            return
        if (ctx is not None and isinstance(ctx.get("nucleus"), dict)
                and mapping.given_back(event, now_ms()) is not None):
            return   # a Nucleus event mapped by another Outpost: enriched there
        # Copies, never changes in place: a batch's context objects are shared by
        # all of its messages (agent/families/segment.py merge).
        ctx = event["context"] = dict(ctx or {})
        facts = self.facts
        if _missing(ctx.get("locale")):
            ctx["locale"] = facts.language
        _fill(ctx, "os", (("name", facts.platform), ("version", facts.osVersion)))
        rest = (("totalRam", facts.totalRam), ("arch", facts.arch))
        _fill(ctx, "device", rest if _is_id(event.get("anonymousId"))
              else (("id", facts.machineId), *rest))


def _missing(value: Any) -> bool:
    """A fact left out: absent, JSON null, or "" (what names nothing)."""
    return value is None or value == ""


def _is_id(value: Any) -> bool:
    """segment.is_id (which imports this module): a non-empty string or a number."""
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fill(ctx: dict[str, Any], name: str, pairs: tuple[tuple[str, Any], ...]) -> None:
    part = ctx.get(name)
    if part is not None and not isinstance(part, dict):
        return
    part = ctx[name] = dict(part or {})
    for key, value in pairs:
        if _missing(part.get(key)):
            part[key] = value
