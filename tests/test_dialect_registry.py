"""Adding a local API is one module plus one registry line (agent/dialects/registry.py).

A trivial dialect, written here as its own module would be, is added to DIALECTS and
nothing else: the agent serves its routes, guarded (Host, Origin, Fetch Metadata) and
keyed (listen.accept_keys) like every other, and the security tests reach it through
its example.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from aiohttp import web

from agent.dialects import registry
from agent.dialects.base import JSON, Dialect, Example, IngestSink
from agent.dialects.body import read_raw
from agent.dialects.exact_json import parse_json
from agent.families import segment
from tests.dialect_examples import as_http, served_by_examples
from tests.fakes.threaded_agent import ThreadedAgent
from tests.test_fetch_metadata import check_cross_site
from tests.test_security import ALLOWED, GOOD, check_hosts, check_keys, check_origins


def routes(sink: IngestSink) -> list[web.RouteDef]:
    async def ingest(request: web.Request) -> web.StreamResponse:
        key = request.headers.get("X-Trivial-Key")
        if (why := sink.key_refusal(key)) is not None:
            return web.json_response({"error": f"refused: {why}"}, status=401)
        assert key is not None
        doc = parse_json(await read_raw(request, 4096))
        await sink.store([segment.accept(doc, key, segment.TYPES, segment.received_now(),
                                         enrich=sink.enrich)])
        return web.Response(status=204)
    return [web.post("/trivial/ingest", ingest)]


def examples(key: str) -> list[Example]:
    return [Example("POST", "/trivial/ingest", {**JSON, "X-Trivial-Key": key},
                    orjson.dumps({"type": "track", "event": "e", "userId": "u"}))]


TRIVIAL = Dialect("trivial", routes, examples)


def test_a_dialect_added_to_the_registry_is_served_guarded_and_keyed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    *others, last = registry.DIALECTS
    monkeypatch.setattr(registry, "DIALECTS", (*others, TRIVIAL, last))
    with ThreadedAgent(tmp_path, listen={"accept_keys": [GOOD], "allowed_origins": [ALLOWED]}) \
            as agent:
        assert agent.agent is not None and agent.agent.sink is not None
        assert served_by_examples(TRIVIAL, agent.agent.sink) == ({"POST /trivial/ingest"},) * 2
        requests = [as_http(ex) for ex in TRIVIAL.examples(GOOD)]
        check_hosts(agent, requests)
        check_cross_site(agent, requests)
        check_origins(agent, TRIVIAL.examples(GOOD))
        before = agent.depth
        check_keys(agent, (TRIVIAL,))
        assert agent.depth == before + 1
        assert agent.request(*as_http(TRIVIAL.examples(GOOD)[0]))[0] == 204
