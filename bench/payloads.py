"""The events the load generators send, shared by the wrk scripts and the Python clients.

Every request carries new ids, because Outpost stores a resend only once:
a generator that repeated one body would measure the dedupe path, not ingest.
Shapes follow what real clients send (nucleus-nodejs events, analytics-python track calls).
"""

from __future__ import annotations

import base64

WRITE_KEY = "benchkey"
APP_ID = "benchapp"
BASIC_AUTH = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()

# Two integer holes each: (unique id, session id). Roughly 230 bytes, as a real module sends.
NUCLEUS_EVENT = (
    '{"type":"event","name":"button_click","date":"2026-01-15T10:20:30.123Z",'
    '"appId":"benchapp","id":%d,"userId":"user-1234",'
    '"machineId":"4f1c9e2a7b3d8e6f0a1b2c3d4e5f6a7b","sessionId":%d,'
    '"payload":{"screen":"settings","button":"save","count":3}}')
SEGMENT_EVENT = (
    '{"type":"track","event":"Button Clicked","userId":"user-1234",'
    '"messageId":"bench-%d-%d","timestamp":"2026-01-15T10:20:30.123Z",'
    '"properties":{"screen":"settings","button":"save","count":3},'
    '"context":{"library":{"name":"analytics-python","version":"2.4.0"}}}')
# The same with a uuid4-shaped `messageId`, as Segment's SDKs make them (the id's own bits in
# the first group, the session's in the last): its "9e-4123" is what one random uuid4 in
# 25 holds, the shape of a tiny number's exponent to a search of bytes (nearly every
# 100-message batch of real uuid4s holds one).
SEGMENT_UUID_EVENT = SEGMENT_EVENT.replace('"bench-%d-%d"', '"%08x-c19e-4123-8d2e-%012x"')
# The browser's (analytics.js) shape: its key in the batch and in each message.
SEGMENT_BROWSER_EVENT = (
    '{"type":"track","event":"Button Clicked","anonymousId":"anon-1234",'
    '"messageId":"ajs-next-%d-%d","timestamp":"2026-01-15T10:20:30.123Z",'
    '"properties":{"screen":"settings","button":"save","count":3},'
    '"context":{"library":{"name":"analytics.js","version":"next-1.70.0"},'
    '"page":{"path":"/settings","url":"https://example.com/settings"},"locale":"en-US"},'
    '"writeKey":"benchkey"}')

# kind -> (event template, prefix, suffix) of a request body
KINDS = {
    "nucleus": (NUCLEUS_EVENT, '{"data":[', "]}"),
    "segment": (SEGMENT_EVENT, '{"batch":[', '],"sentAt":"2026-01-15T10:20:31.000Z"}'),
    "segment_uuid": (SEGMENT_UUID_EVENT, '{"batch":[', '],"sentAt":"2026-01-15T10:20:31.000Z"}'),
    "segment1": (SEGMENT_EVENT, "", ""),   # one call on /v1/track: the event is the body
    "segment_browser": (SEGMENT_BROWSER_EVENT, '{"writeKey":"benchkey","batch":[',
                        '],"sentAt":"2026-01-15T10:20:31.000Z"}'),
}


def body(kind: str, first_id: int, n: int, session: int) -> bytes:
    """A request body of ``n`` events with ids first_id .. first_id+n-1."""
    template, prefix, suffix = KINDS[kind]
    events = ",".join(template % (first_id + i, session) for i in range(n))
    return (prefix + events + suffix).encode()


def raw_event_bytes(kind: str = "nucleus") -> int:
    """Bytes of one event as an app sends it (for spool bytes per event)."""
    return len(KINDS[kind][0] % (1_000_000, 123_456_789))
