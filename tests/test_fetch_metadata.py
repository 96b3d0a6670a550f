"""Fetch Metadata: a web page on another site cannot make a browser write events.

An image load carries no Origin, so `<img src="http://127.0.0.1:8765/v1/pixel/track?data=…">`
on any site used to write to the spool. Browsers mark every request with
`Sec-Fetch-Site`; a `cross-site` one is refused (403) unless its Origin, or with none its
Referer's origin, is in listen.allowed_origins, on every route. A link followed from
another site to the status page or the other GET operations routes still opens them.
Clients that send no Sec-Fetch-* headers (apps, SDKs, curl) are unaffected.

The browser test runs headless Chromium: a page served by a real aiohttp server under
`evil.test` / `allowed.test` (mapped to 127.0.0.1 with --host-resolver-rules: a
registrable name other than the agent's, so cross-site, not merely another port) embeds
the pixel, and sets its title from the image's load/error event; --dump-dom returns once
the page (and so the image) has loaded.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import run_chromium
from tests.dialect_examples import examples
from tests.fakes.threaded_agent import ThreadedAgent
from tests.test_security import ALLOWED, GOOD, Request, every_request

CROSS_SITE_IMAGE = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors",
                    "Sec-Fetch-Dest": "image", "Referer": "https://evil.example/page"}
NAVIGATION = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
              "Sec-Fetch-Dest": "document", "Sec-Fetch-User": "?1",
              "Referer": "https://wiki.example/"}


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[ThreadedAgent]:
    with ThreadedAgent(tmp_path, listen={"accept_keys": [GOOD], "allowed_origins": [ALLOWED]}) \
            as agent:
        yield agent


def pixel_path(key: str, event: str) -> str:
    data = {"writeKey": key, "event": event, "userId": "u", "messageId": uuid.uuid4().hex}
    return "/v1/pixel/track?data=" + base64.urlsafe_b64encode(orjson.dumps(data)).decode()


def check_cross_site(agent: ThreadedAgent, requests: list[Request]) -> None:
    before = agent.depth
    for method, path, body, headers in requests:
        status, _, reply = agent.request(method, path, body, {**headers, **CROSS_SITE_IMAGE})
        assert status == 403, (method, path, status, reply[:200])
        assert b"cross-site" in reply and b"listen.allowed_origins" in reply
    assert agent.depth == before


def test_a_cross_site_request_is_refused_on_every_route(guarded: ThreadedAgent) -> None:
    check_cross_site(guarded, every_request(guarded, examples(GOOD)))


@pytest.mark.parametrize("headers", [
    {"Referer": ALLOWED + "/shop/cart?x=1"},
    {"Referer": ALLOWED + "/", "Origin": ALLOWED},
    {"Referer": "https://evil.example/", "Origin": ALLOWED},
], ids=["allowed-referer", "allowed-origin", "allowed-origin-wins"])
def test_a_cross_site_pixel_from_an_allowed_origin_is_stored(
        guarded: ThreadedAgent, headers: dict[str, str]) -> None:
    status, _, _ = guarded.request("GET", pixel_path(GOOD, "ok"), None, {
        **CROSS_SITE_IMAGE, **headers})
    assert status == 200
    assert guarded.depth == 1


@pytest.mark.parametrize("headers", [
    {"Referer": "https://evil.example/"},
    {},  # referrerpolicy="no-referrer": nothing to vouch for the page
    {"Referer": "not a url"},
    {"Referer": "http://[::1/"},
    {"Referer": ALLOWED + ".evil.example/"},
], ids=["foreign", "no-referer", "garbage", "bad-ipv6", "prefix-lookalike"])
def test_a_cross_site_pixel_without_an_allowed_origin_stores_nothing(
        guarded: ThreadedAgent, headers: dict[str, str]) -> None:
    base = {k: v for k, v in CROSS_SITE_IMAGE.items() if k != "Referer"}
    status, _, _ = guarded.request("GET", pixel_path(GOOD, "evil"), None, {**base, **headers})
    assert status == 403
    assert guarded.depth == 0


@pytest.mark.parametrize("site", ["same-origin", "same-site", "none", None])
def test_same_site_and_non_browser_requests_are_unaffected(
        guarded: ThreadedAgent, site: str | None) -> None:
    headers = {} if site is None else {"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "no-cors",
                                       "Sec-Fetch-Dest": "image"}
    assert guarded.request("GET", pixel_path(GOOD, "ok"), None, headers)[0] == 200
    assert guarded.depth == 1


@pytest.mark.parametrize("path", ["/", "/status", "/healthz", "/metrics"])
def test_a_link_from_another_site_still_opens_the_operations_pages(
        guarded: ThreadedAgent, path: str) -> None:
    assert guarded.request("GET", path, None, NAVIGATION)[0] == 200


def test_a_cross_site_navigation_to_the_pixel_stores_nothing(guarded: ThreadedAgent) -> None:
    """`location = pixelUrl` from another site is a top-level navigation too."""
    assert guarded.request("GET", pixel_path(GOOD, "evil"), None, NAVIGATION)[0] == 403
    assert guarded.depth == 0


# -- a real browser ------------------------------------------------------------------------------

@pytest.fixture
async def page_server() -> AsyncIterator[Callable[[str], str]]:
    """Serves /page?src=URL: an <img> of URL that titles the page `loaded` or `failed`."""
    async def page(request: web.Request) -> web.Response:
        src = request.query["src"].replace("&", "&amp;").replace('"', "&quot;")
        return web.Response(content_type="text/html", text=(
            "<!doctype html><html><head><title>waiting</title></head><body>"
            f'<img src="{src}" onload="document.title=\'loaded\'" '
            "onerror=\"document.title='failed'\"></body></html>"))

    app = web.Application()
    app.router.add_get("/page", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield lambda host: f"http://{host}:{port}"
    await runner.cleanup()


async def test_in_chromium_a_cross_site_pixel_writes_nothing_and_an_allowed_one_does(
        make_agent: Callable[..., Any], chromium: str, tmp_path: Path,
        page_server: Callable[[str], str]) -> None:
    allowed, evil = page_server("allowed.test"), page_server("evil.test")
    agent = await make_agent(listen={"allowed_origins": [allowed]})

    async def visit(origin: str, event: str, profile: str) -> str:
        pixel = f"http://127.0.0.1:{agent.port}{pixel_path(GOOD, event)}"
        page = f"{origin}/page?src=" + pixel.replace("%", "%25").replace("&", "%26") \
            .replace("?", "%3F").replace("=", "%3D")
        return await run_chromium(
            chromium, tmp_path / profile,
            "--host-resolver-rules=MAP evil.test 127.0.0.1, MAP allowed.test 127.0.0.1",
            "--dump-dom", page)

    dom = await visit(evil, "evil", "p1")
    assert "<title>failed</title>" in dom, dom[:500]   # a 403 is no image
    assert agent.spool.depth == 0
    dom = await visit(allowed, "allowed", "p2")
    assert "<title>loaded</title>" in dom, dom[:500]
    assert agent.spool.depth == 1
