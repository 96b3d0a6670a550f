"""Operator endpoints that change the agent are for local tools and the agent's own page.

A page on one of ``listen.allowed_origins`` may send events; it may not make the agent
act (``/flush``), just as it may not touch dead letters.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import aiohttp
import pytest

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


def own_other_address() -> str | None:
    """An IPv4 address of this machine's that is not loopback (the source of its route
    out), or None. A connection from it to 127.0.0.1 comes from an address that is neither
    loopback nor the one it reached: what a LAN device's connection looks like."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))   # UDP: nothing is sent
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if ipaddress.ip_address(address).is_loopback else address


LOCAL_ONLY = [("GET", "/dead", None), ("GET", "/dead/export", None),
              ("GET", "/dead/1", None), ("POST", "/dead/purge", {"all": True}),
              ("POST", "/dead/retry", {"all": True}), ("POST", "/flush", None),
              ("GET", "/tail", None)]


async def test_another_machine_cannot_use_the_local_only_endpoints(make_agent: Any) -> None:
    """Listening beyond loopback (for LAN devices to post), the endpoints for local tools
    and the agent's own page (dead letters: app data, and purge; the live view of every
    app's events; /flush) answered any device on the network: they are not apps' web
    pages, so nothing refused them."""
    other = own_other_address()
    if other is None:
        pytest.skip("no address but loopback")
    agent = await make_agent(port=free_port(), listen={"host": "0.0.0.0"})
    base = f"http://127.0.0.1:{agent.port}"
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(other, 0))) as s:
        for method, path, body in LOCAL_ONLY:
            # The own page's headers do not help either: it was opened on another machine.
            for headers in ({}, {"Origin": base, "Sec-Fetch-Site": "same-origin"}):
                async with s.request(method, base + path, json=body, headers=headers) as r:
                    assert r.status == 403, (method, path, headers, await r.text())
                    assert other in (await r.json())["error"]
        # What any device may read stays readable.
        for path in ("/healthz", "/status"):
            async with s.get(base + path) as r:
                assert r.status == 200, path
    # A local tool still may.
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/dead/purge", json={"all": True}) as r:
            assert r.status == 200, await r.text()
        async with s.get(f"{base}/dead") as r:
            assert r.status == 200, await r.text()
