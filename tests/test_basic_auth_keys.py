"""A key holding ':' cannot be the username of the Basic auth a segment-http upstream is
sent (RFC 7617: the username ends at the first colon), so such a key routed there, with
no `key` of the upstream's own to send instead, is refused at ingest (401, saying why):
accepted, its events reached the upstream under another key, the part before the colon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.logs import fingerprint
from tests.conftest import write_config
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import call, segment_up, wait_for
from tests.test_config import check_config

COLON_KEY = "ab:cd"


def track(mid: str) -> dict[str, Any]:
    return {"type": "track", "event": "Clicked", "userId": "u-1", "messageId": mid}


async def test_a_key_with_a_colon_routed_to_segment_http_is_refused(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    batch = await call(agent.port, "/v1/batch",
                       {"batch": [track("c-1")], "writeKey": COLON_KEY})
    single = await call(agent.port, f"/v1/track?writeKey={COLON_KEY}", track("c-2"))
    capture = await call(agent.port, "/v1/capture", {"batch": [track("c-3")]},
                         headers={"X-Write-Key": COLON_KEY})
    for reply in (batch, single, capture):
        assert reply.status == 401, reply.body
        assert "':'" in reply.body.decode(), reply.body
    assert agent.spool.depth == 0
    # A key without one is taken and sent as it came.
    ok = await call(agent.port, "/v1/batch", {"batch": [track("c-4")], "writeKey": "abcd"})
    assert ok.status == 200, ok.body
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert [r.write_key for r in fake_segment.requests] == ["abcd"]


async def test_a_key_with_a_colon_is_taken_where_the_upstream_sends_its_own_key(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment, key="upstreamKey")])
    reply = await call(agent.port, "/v1/batch", orjson.dumps(
        {"batch": [track("o-1")], "writeKey": COLON_KEY}))
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.requests[0].write_key == "upstreamKey"


async def test_a_colon_keys_queue_a_reload_sends_under_the_apps_key_stays_queued_saying_why(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """Taken while the upstream sent a key of its own, then its `key` removed by a reload:
    the queued events would have reached the upstream under 'ab', another key's account.
    They stay queued instead, retried with backoff, last_error saying why, until the
    configuration gives them a key again."""
    fake_segment.outage = (503, None)
    agent = await make_agent(upstreams=[segment_up(fake_segment, key="upstreamKey")])
    reply = await call(agent.port, "/v1/batch", {"batch": [track("r-1")], "writeKey": COLON_KEY})
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_segment.requests) >= 1)
    write_config(Path(agent.config_path), agent.spool.path, upstreams=[segment_up(fake_segment)])
    await agent.reload()
    fake_segment.outage = None

    async def sent_or_said() -> bool:
        return bool(fake_segment.events) or "':'" in ((await upstream(agent.port))["last_error"] or "")

    await wait_for(sent_or_said)
    assert not fake_segment.events, [r.write_key for r in fake_segment.requests]
    assert agent.spool.depth == 1
    # A key of the upstream's own again: they go, under it.
    write_config(Path(agent.config_path), agent.spool.path,
                 upstreams=[segment_up(fake_segment, key="upstreamKey")])
    await agent.reload()
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.accepted()[-1].write_key == "upstreamKey"


async def upstream(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/status") as r:
        (up,) = (await r.json())["upstreams"]
        return dict(up)


@pytest.mark.parametrize(("where", "noted"), [
    ('[listen]\naccept_keys = ["ab:cd", "plain"]\n', True),
    ('', False),   # "*" only: no key is named
])
def test_check_config_notes_a_named_colon_key_that_every_request_of_would_be_refused(
        tmp_path: Path, where: str, noted: bool) -> None:
    """A key the config names (listen.accept_keys, an upstream's keys) that ingest will
    refuse at every request: check-config said ok, and the app found out at its first."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'{where}\n[[upstream]]\nname = "own"\nprotocol = "segment-http"\n'
                   'url = "https://api.segment.io"\nkey = "k"\nkeys = ["x:y"]\n\n'
                   '[[upstream]]\nname = "seg"\nprotocol = "segment-http"\n'
                   'url = "https://api.segment.io"\nkeys = ["*"]\n')
    run = check_config(str(cfg))
    assert run.returncode == 0, run.stderr
    notes = [ln for ln in run.stdout.splitlines() if ln.startswith("note:")]
    notes = [ln for ln in notes if "':'" in ln]
    if not noted:
        assert notes == [], run.stdout
        return
    (note,) = notes   # not 'x:y': its upstream sends a key of its own
    assert fingerprint("ab:cd") in note and "'seg'" in note, note


def test_check_configs_note_of_a_colon_key_names_it_by_fingerprint_only(
        tmp_path: Path) -> None:
    """Keys are credentials: a message names one by its fingerprint, never shown
    (docs/operations.md). The note printed the key itself, on check-config's stdout, which
    is the journal's when systemd's ExecReload runs `outpost check-config --reload`."""
    key = "app:s3cret-write-key"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[listen]\naccept_keys = ["{key}"]\n\n[[upstream]]\nname = "seg"\n'
                   'protocol = "segment-http"\nurl = "https://api.segment.io"\nkeys = ["*"]\n')
    run = check_config(str(cfg))
    assert run.returncode == 0, run.stderr
    (note,) = [ln for ln in run.stdout.splitlines() if "':'" in ln]
    assert fingerprint(key) in note, note
    assert "s3cret" not in run.stdout + run.stderr, run.stdout
