"""The status page shows an upstream's refusal text and an app's event names as the CLI and the
log do: characters a browser obeys without showing them (a bidi override that shows
``txt\\u202eexe.js`` as ``txtsj.exe``, zero-width and line separators) and controls appear
escaped, never applied; their backslashes doubled, as the CLI's printable_value doubles them
(a name holding the six characters ``\\u202e`` is not shown as one holding U+202E). Each
row's data attribute keeps the text as it came."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.interop.browser.cdp import Chromium
from tests.waiting import wait_for

HOSTILE = "txt\u202eexe.js \x1b[2J\u2028zero\u200bwidth \\u202e"
SHOWN = "txt\\u202eexe.js \\x1b[2J\\u2028zero\\u200bwidth \\\\u202e"


async def refuse(request: web.Request) -> web.Response:
    # Raw UTF-8, as an upstream may write it (json_response would send ASCII escapes).
    return web.Response(status=400, text=f'{{"error": "{HOSTILE}"}}',
                        content_type="application/json")


async def test_error_text_and_event_names_are_shown_escaped(
        make_agent: Any, chromium: str, tmp_path: Path) -> None:
    app = web.Application()
    app.add_routes([web.post("/app/{appId}/track", refuse)])
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        agent = await make_agent(upstreams=[{"name": "strict", "protocol": "nucleus-http",
                                             "url": url, "flush_interval_s": 0.05,
                                             "timeout_s": 2}])
        async with Chromium(chromium, tmp_path / "profile") as browser:
            page = await browser.open(f"http://127.0.0.1:{agent.port}/")
            await wait_for(lambda: page.evaluate("!!document.getElementById('live-toggle')"))
            await page.evaluate("document.getElementById('live-toggle').click()")
            await wait_for(lambda: page.evaluate(
                "document.getElementById('live-state').textContent === 'live'"))
            async with aiohttp.ClientSession() as s, s.post(
                    f"http://127.0.0.1:{agent.port}/app/app1/track",
                    json={"data": [{"type": "event", "name": HOSTILE, "id": 1,
                                    "sessionId": 1, "machineId": "m"}]}) as r:
                assert r.status == 200, await r.text()
            assert agent.spool is not None
            await wait_for(lambda: agent.spool.counters.get("dead_lettered", 0) == 1)
            dead = "#dead tr"
            await wait_for(lambda: page.evaluate(
                f"(document.querySelector({dead!r})?.dataset.dead ?? '').includes('exe')"))
            text, value = await page.evaluate(
                f"(() => {{ const tr = document.querySelector({dead!r}); "
                "return [tr.firstChild.textContent, tr.dataset.dead]; })()")
            live = await page.evaluate(
                "[...document.querySelectorAll('#live tr[data-kind=\"ingested\"] td')]"
                ".map(td => td.textContent)")
    finally:
        await runner.cleanup()
    assert HOSTILE in value, value            # the value as it came, for scripts
    assert SHOWN in text and "\u202e" not in text and "\x1b" not in text, text
    assert any(SHOWN in t for t in live) and not any("\u202e" in t for t in live), live


def refusing(said: str) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.post("/app/{appId}/track")
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=400, text=f'{{"error": "{said}"}}',
                            content_type="application/json")
    return routes


async def test_a_long_reason_is_cut_between_characters_never_inside_one(
        make_agent: Any, chromium: str, tmp_path: Path) -> None:
    """The page cuts a dead letter's reason past 80 characters, as the CLI does, but it
    counted JavaScript's UTF-16 units: a character past U+FFFF (an emoji) the cut fell in
    was cut in two, and its first half, a lone surrogate, shown as the escape ``\\ud83d``,
    as if the upstream had said that. Two upstreams, one with a letter more before the
    emoji: the cut falls inside one emoji for one of them, whatever the reason's prefix."""
    runners = []
    upstreams = []
    for name, said in (("even", "\U0001F600" * 60), ("odd", "x" + "\U0001F600" * 60)):
        app = web.Application()
        app.add_routes(refusing(said))
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        upstreams.append({"name": name, "protocol": "nucleus-http", "keys": [f"app-{name}"],
                          "url": f"http://127.0.0.1:{runner.addresses[0][1]}",
                          "flush_interval_s": 0.05, "timeout_s": 2})
    try:
        agent = await make_agent(upstreams=upstreams)
        async with aiohttp.ClientSession() as s:
            for name in ("even", "odd"):
                async with s.post(f"http://127.0.0.1:{agent.port}/app/app-{name}/track",
                                  json={"data": [{"type": "event", "name": "e", "id": 1,
                                                  "sessionId": 1, "machineId": "m"}]}) as r:
                    assert r.status == 200, await r.text()
        assert agent.spool is not None
        await wait_for(lambda: agent.spool.counters.get("dead_lettered", 0) == 2)
        async with Chromium(chromium, tmp_path / "profile") as browser:
            page = await browser.open(f"http://127.0.0.1:{agent.port}/")
            await wait_for(lambda: page.evaluate(
                "document.querySelectorAll('#dead tr[data-dead]').length === 2"))
            rows = await page.evaluate(
                "[...document.querySelectorAll('#dead tr[data-dead]')]"
                ".map(tr => [tr.dataset.dead, tr.firstChild.textContent])")
    finally:
        for runner in runners:
            await runner.cleanup()
    for reason, text in rows:
        assert text.endswith("…") and len(text) < len(reason), (reason, text)
        kept = text.removesuffix("…")
        assert "\\u" not in kept and reason.startswith(kept), (reason, text)
        assert len(kept) == 79, text   # characters, as the CLI counts them
