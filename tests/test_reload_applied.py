"""What a reload (SIGHUP) applies at once, and what it says needs a restart
(docs/operations.md "Reload (SIGHUP)"). In-process agents; ``Agent.reload`` is what
SIGHUP runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType

from tests.conftest import write_config
from tests.test_upstream_faults import event


async def test_a_key_a_reload_no_longer_accepts_is_refused_on_a_websocket_already_open(
        make_agent: Any) -> None:
    """A Nucleus module keeps its websocket open for good: a key taken out of
    listen.accept_keys must stop being stored on it too, not only on new connections."""
    agent = await make_agent(listen={"accept_keys": ["kept", "revoked"]})
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{agent.port}/app/revoked/track") as ws:
            await ws.send_json({"data": [event(1)]})
            assert await ws.receive_json() == {"reportedIds": [1]}
            write_config(Path(agent.config_path), agent.spool.path,
                         listen={"accept_keys": ["kept"]})
            await agent.reload()
            await ws.send_json({"data": [event(2)]})
            msg = await ws.receive()
        assert msg.type == WSMsgType.CLOSE, msg
        assert msg.data == WSCloseCode.POLICY_VIOLATION, msg
        assert "listen.accept_keys" in msg.extra, msg
    assert agent.spool.streams["revoked"].depth == 1   # the first event only
