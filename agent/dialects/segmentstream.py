"""The SegmentStream HTTP tracking API (seed 001): `POST /track`, answered 204.

The API token is the Basic auth username (401 when missing or not accepted).
The event is nested: `event.{category,name,label,user,...}`, and `hitId`
dedupes resends. The seed answers 400 both for invalid JSON and for a body
over 64 KB. Each hit is stored as a Segment `track` (docs/mapping.md):

- `event.name` (else `event.category`) becomes `event`, and `hitId` the `messageId`;
- the other fields of `event`, user aside, become `properties`;
- `user.userId` / `user.anonymousId` go to the top level, the rest of
  `user` to `context.traits`;
- `sentAt`, which this API defines as the time the hit happened, becomes `timestamp`.

Those places win; a value of the app's that one of them replaces (a top-level
`properties`, `type`, ...; a `user` field that `context.traits` holds too) is kept
verbatim in `context.segmentstream`, so nothing the app sent is lost.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from agent.dialects import replies
from agent.dialects.auth import BadAuth, basic, basic_user
from agent.dialects.base import JSON, Dialect, Example, IngestSink
from agent.dialects.body import read_raw
from agent.dialects.exact_json import parse_json
from agent.families import segment as spec
from agent.families.errors import Invalid

MAX_BODY = 64 * 1024
TYPES = frozenset({"track"})
_IDS = ("userId", "anonymousId")
SET_ASIDE = "segmentstream"   # context key of the app's values the hit's own replaced
# A 401 with no token says where one goes (the sink's own reason, "no key given", does not).
NO_TOKEN_GIVEN = ("no API token given: send it as the username of Basic auth "
                  "(`Authorization: Basic` and the base64 of `TOKEN:`)")


def error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    return replies.json_reply({"error": message}, status, retry_after)


def to_segment(body: Any) -> dict[str, Any]:
    """A SegmentStream hit as a Segment track message; raises Invalid."""
    if not isinstance(body, dict):
        raise Invalid("body must be a JSON object")
    event = body.get("event")
    if not isinstance(event, dict):
        raise Invalid("`event` (an object) is required")
    user = event.get("user")
    if user is None:   # JSON null, as clients send an optional field they have no value for
        user = {}
    if not isinstance(user, dict):
        raise Invalid("`event.user` must be an object")
    _check_user_ids(body, user)
    spec.check_dates(body)   # before `sentAt` becomes `timestamp`: the error names it
    hit_id = body.get("hitId")
    if hit_id is not None and not isinstance(hit_id, str):
        raise Invalid("`hitId` must be a string")
    # It becomes the messageId: checked here, so that the 400 names the field the app sent.
    if hit_id is not None and not 0 < len(hit_id) <= spec.MAX_MESSAGE_ID:
        raise Invalid(f"`hitId` must be a string of 1 to {spec.MAX_MESSAGE_ID} characters "
                      "(the limit of the Segment id it becomes)")
    name = event.get("name") or event.get("category")
    if not isinstance(name, str) or not name:
        raise Invalid("`event.name` (or `event.category`) must be a non-empty string")
    out = {k: v for k, v in body.items() if k not in ("hitId", "sentAt", "event")}
    # `event.name` leaves the properties only when it is the `event` (not "" beside a category).
    placed: dict[str, Any] = {"type": "track", "event": name, "properties": {
        k: v for k, v in event.items() if k != "user" and not (k == "name" and v == name)}}
    placed.update({k: user[k] for k in _IDS if user.get(k) is not None})
    if hit_id is not None:
        placed["messageId"] = hit_id
    if body.get("sentAt") is not None:   # checked above: a date string
        placed["timestamp"] = body["sentAt"]
    aside = {k: out[k] for k, v in placed.items() if k in out and _differs(out[k], v)}
    out.update(placed)
    context = out.get("context")
    if context is not None and not isinstance(context, dict):
        raise Invalid("`context` must be an object")
    traits = {k: v for k, v in user.items() if k not in _IDS}
    if traits:
        if context and "traits" in context:   # the hit's own context.traits win
            own = context["traits"]
            clash = {k: v for k, v in traits.items() if k in own and _differs(own[k], v)} \
                if isinstance(own, dict) else traits
            if clash:
                aside["traits"] = clash
            # Each of its values whole, not merged with the user's (an object trait in
            # both): that would be a value the app sent in neither place.
            traits = {**traits, **own} if isinstance(own, dict) else own
        # traits first, then the hit's other context fields
        context = out["context"] = {"traits": traits, **(context or {})}
        context["traits"] = traits
    if aside:
        if context is not None and SET_ASIDE in context:
            raise Invalid(f"`context.{SET_ASIDE}` is where the hit's replaced fields are kept "
                          f"({', '.join(aside)}): send yours under another name")
        out["context"] = {**(context or {}), SET_ASIDE: aside}
    return out


def _check_user_ids(body: dict[str, Any], user: dict[str, Any]) -> None:
    """Raise Invalid naming `event.user.userId` / `.anonymousId` as the hit has them: the
    family rules would name the Segment message's top-level `userId`, a field the hit never
    had. (A top-level id of the app's own, kept where the user has none, still counts.)"""
    for name in _IDS:
        value = user.get(name)
        if value is not None and value != "" and not spec.is_id(value):
            raise Invalid(f"`event.user.{name}` must be a string")
    if not any(spec.is_id(user[k] if user.get(k) is not None else body.get(k)) for k in _IDS):
        raise Invalid("`event.user.userId` or `event.user.anonymousId` is required")


def _differs(a: Any, b: Any) -> bool:
    """Whether two values are not the same JSON (1, 1.0 and true are three values)."""
    try:
        return orjson.dumps(a) != orjson.dumps(b)
    except orjson.JSONEncodeError:   # nested past orjson's depth: storing it will say so
        return True


class SegmentStreamHandlers:
    """Route handlers bound to the shared sink."""

    def __init__(self, sink: IngestSink) -> None:
        self.sink = sink

    async def track(self, request: web.Request) -> web.StreamResponse:
        try:
            key = basic_user(request.headers.get("Authorization"))
        except BadAuth as exc:   # there, but naming no token: said, not taken for none
            return error(401, f"missing or invalid API token: {exc}")
        why = NO_TOKEN_GIVEN if key is None else self.sink.key_refusal(key)
        if why is not None:
            return error(401, f"missing or invalid API token: {why}")
        assert key is not None

        async def work() -> None:
            body = parse_json(await read_raw(request, MAX_BODY))
            await self.sink.store([spec.accept(to_segment(body), key, TYPES, spec.received_now(),
                                                  enrich=self.sink.enrich)])

        # The seed documents 400 for every client mistake, a body over 64 KB included.
        return await replies.settle(work(), error, client_status=400) or web.Response(status=204)


def routes(sink: IngestSink) -> list[web.RouteDef]:
    return [web.post("/track", SegmentStreamHandlers(sink).track)]


def examples(key: str) -> list[Example]:
    hit = {"event": {"category": "c", "name": "n", "user": {"anonymousId": "a"}}}
    return [Example("POST", "/track", {**JSON, "Authorization": basic(key)}, orjson.dumps(hit))]


DIALECT = Dialect("segmentstream", routes, examples)
