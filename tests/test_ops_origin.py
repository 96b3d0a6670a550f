"""Operator endpoints that change the agent are for local tools and the agent's own page.

A page on one of ``listen.allowed_origins`` may send events; it may not make the agent
act (``/flush``), just as it may not touch dead letters.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import free_port


async def test_an_allowed_app_origin_cannot_flush(make_agent: Any) -> None:
    agent = await make_agent(port=free_port(),
                             listen={"allowed_origins": ["https://app.example"]})
    base = f"http://127.0.0.1:{agent.port}"
    async with aiohttp.ClientSession() as s:
        for headers in ({"Origin": "https://app.example"},
                        {"Sec-Fetch-Site": "cross-site", "Referer": "https://app.example/"}):
            async with s.post(f"{base}/flush", headers=headers) as r:
                assert r.status == 403, await r.text()
                assert "/flush" in (await r.json())["error"]
        # A local tool (no Origin) and the agent's own page still may.
        for headers in ({}, {"Origin": base, "Sec-Fetch-Site": "same-origin"}):
            async with s.post(f"{base}/flush", headers=headers) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["flushing"] is True
