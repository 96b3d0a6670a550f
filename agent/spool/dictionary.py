"""The built-in zstd dictionary that small records are packed with (records.ZSTD_DICT).

A record of one request's few events compresses poorly: zstd has nothing earlier in it to
refer to, and the field names and usual values are much of each event. An app posting
one event at a time (a browser's analytics.js, a quiet device) stored each in a record of
0.8-0.9x its JSON. This dictionary gives zstd those names and values as if they came
first: what each family's API documents and what real clients send (the Segment spec's
calls and context, analytics.js's page context, the Nucleus modules' event fields,
docs/mapping.md's mapped forms), in the compact JSON the spool stores. It holds nothing of
any one app or device. Measured: a lone event packs to 0.63-0.79x of what zstd alone made
of it (tests/test_records.py, bench/micro_records.py), 16 events to 0.93x; past a few
KiB of events the record is its own context (records.DICT_BELOW).

It is raw content, not a trained dictionary: zstd refers into it as into earlier input,
and the nearer the end, the cheaper a reference, so the commonest shapes come last.

These bytes must never change: every record packed with them needs exactly them to be read
(tests/test_records.py pins their digest). Another dictionary would be another codec tag.
"""

from __future__ import annotations

_NUCLEUS = (
    b'{"type":"init","name":"init","date":"2026-01-01T00:00:00.000Z","appId":"","id":1,'
    b'"userId":null,"machineId":"","deviceId":"","anonId":"","sessionId":1,'
    b'"client":"nodejs","platform":"Linux","osVersion":"6.1.0-amd64","totalRam":16,'
    b'"version":"1.0.0","locale":"en-US","language":"en","arch":"x64",'
    b'"moduleVersion":"4.0.0","payload":{}}'
    b'{"type":"init","client":"python","platform":"Windows_NT","osVersion":"10.0.19045",'
    b'"arch":"arm64","locale":"en-GB"}{"client":"electron","platform":"Darwin",'
    b'"osVersion":"23.1.0","arch":"x86_64"}'
    b'{"type":"error","name":"TypeError","payload":{"message":"","stack":"Error: "}}'
    b'{"type":"userid"}{"type":"props","payload":{"$segment":{}}}'
    b'{"type":"nucleus:view","name":"/","payload":{}}'
    b'{"type":"event","name":"","date":"2026-01-01T00:00:00.000Z","appId":"","id":1,'
    b'"userId":null,"machineId":"","sessionId":1,"payload":{}}'
)

_SEGMENT = (
    b'{"type":"identify","traits":{"email":"","name":"","firstName":"","lastName":"",'
    b'"phone":"","plan":"","company":{"name":""},"createdAt":""}}'
    b'{"type":"group","groupId":""}{"type":"alias","previousId":""}'
    b'{"type":"screen","name":"","properties":{"name":""}}'
    b'{"type":"page","name":"","category":"","properties":{"path":"/","referrer":"",'
    b'"search":"","title":"","url":"https://"}}'
    b'{"context":{"library":{"name":"analytics.js","version":"next-1.0.0"},'
    b'"page":{"path":"/","referrer":"","search":"","title":"","url":"https://"},'
    b'"userAgent":"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 '
    b'(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36","userAgentData":{"brands":'
    b'[{"brand":"Chromium","version":"120"},{"brand":"Google Chrome","version":"120"}],'
    b'"mobile":false,"platform":"Windows"},"locale":"en-US","timezone":"America/",'
    b'"campaign":{"name":"","source":"","medium":"","term":"","content":""},'
    b'"ip":"","os":{"name":"Linux","version":""},"device":{"id":"","manufacturer":"",'
    b'"model":"","name":"","type":""},"app":{"name":"","version":"","build":"",'
    b'"namespace":""},"screen":{"width":1920,"height":1080,"density":1},'
    b'"network":{"wifi":true,"cellular":false,"bluetooth":false},'
    b'"traits":{},"groupId":"","instanceId":""},"integrations":{},'
    b'"originalTimestamp":"","sentAt":"","channel":"server","version":2,'
    b'"_metadata":{"bundled":[],"unbundled":[]}}'
    b'{"library":{"name":"analytics-node","version":"2.0.0"}}'
    b'{"library":{"name":"@segment/analytics-node","version":"2.0.0"}}'
    b'{"library":{"name":"analytics-ruby","version":"2.0.0"}}'
    b'{"library":{"name":"analytics-go","version":"3.0.0"}}'
    b'{"library":{"name":"RudderStack","version":"1.0.0"}}'
    b'{"type":"track","event":"","userId":"","anonymousId":null,"messageId":"",'
    b'"timestamp":"2026-01-01T00:00:00.000Z","properties":{},'
    b'"context":{"library":{"name":"analytics-python","version":"2.3.3"}},'
    b'"integrations":{},"receivedAt":"2026-01-01T00:00:00.000Z"}'
)

# A Segment call mapped to Nucleus keeps what has no Nucleus place under `$segment`
# (docs/mapping.md); the reverse keeps the Nucleus event under `context.nucleus`.
_MAPPED = (
    b'{"type":"track","event":"","userId":null,"anonymousId":"","messageId":"",'
    b'"timestamp":"","properties":{},"context":{"nucleus":{"type":"event","id":1,'
    b'"appId":"","sessionId":1,"machineId":""}},"receivedAt":""}'
    b'{"type":"event","name":"","payload":{"messageId":"","$segment":{"event":"",'
    b'"userId":"","context":{"library":{"name":"analytics-python","version":"2.3.3"}},'
    b'"timestamp":"","messageId":"","integrations":{},"anonymousId":null,'
    b'"type":"track","receivedAt":""}},"date":"","userId":""}'
)

ZSTD_DICT_V1 = _MAPPED + _SEGMENT + _NUCLEUS
