"""Headless Debian chromium driven over its DevTools protocol with aiohttp's websocket
client: open a page, and record every request it makes, its console and its errors.

Every host name but localhost resolves to nothing (`--host-resolver-rules`), so a client
that reaches for a CDN fails instead of leaving the machine; the recorded requests let
a test prove that none was even tried.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import CHROMIUM_FLAGS

LISTENING = re.compile(r"DevTools listening on (ws://\S+)")
NO_DNS = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"


@dataclass
class Page:
    """One tab: what it requested, logged and threw, as the DevTools events said."""

    ws: aiohttp.ClientWebSocketResponse
    requests: list[str] = field(default_factory=list)    # "METHOD url"
    failed: list[str] = field(default_factory=list)      # "url: error text"
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)

    async def send(self, method: str, **params: Any) -> Any:
        msg_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        return await asyncio.wait_for(fut, 30)

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` (awaited when it is a promise), or the page's error."""
        out = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True,
                              returnByValue=True)
        if "exceptionDetails" in out:
            raise AssertionError(f"page threw: {out['exceptionDetails']}")
        return out["result"].get("value")

    def on(self, msg: dict[str, Any]) -> None:
        if "id" in msg:
            fut = self._pending.pop(msg["id"], None)
            if fut is not None and not fut.done():
                if "error" in msg:
                    fut.set_exception(AssertionError(f"DevTools: {msg['error']}"))
                else:
                    fut.set_result(msg.get("result", {}))
            return
        params = msg.get("params", {})
        method = msg.get("method")
        if method == "Network.requestWillBeSent":
            req = params["request"]
            if not req["url"].startswith("data:"):
                self.requests.append(f"{req['method']} {req['url']}")
        elif method == "Network.loadingFailed":
            self.failed.append(f"{params.get('requestId')}: {params.get('errorText')}")
        elif method == "Runtime.consoleAPICalled":
            self.console.append(params["type"] + " " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(params["exceptionDetails"])[:2000])

    def report(self) -> str:
        """Everything the page did, for an assertion message."""
        return "\n".join(["requests:", *self.requests, "failed:", *self.failed,
                          "console:", *self.console, "errors:", *self.errors])


class Chromium:
    """One headless chromium process with remote debugging on a free port."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.binary, self.profile = binary, profile
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr: list[str] = []
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Chromium:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, *CHROMIUM_FLAGS, NO_DNS, f"--user-data-dir={self.profile}",
            "--remote-debugging-port=0", "--remote-allow-origins=*", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._tasks.append(asyncio.create_task(self._drain(listening)))
        self.browser_url = await asyncio.wait_for(listening, 30)
        self.session = aiohttp.ClientSession()
        return self

    async def _drain(self, listening: asyncio.Future[str]) -> None:
        """Read chromium's stderr to its end (a full pipe would stall it)."""
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.stderr.append(line)
            found = LISTENING.search(line)
            if found and not listening.done():
                listening.set_result(found.group(1))
        if not listening.done():
            listening.set_exception(AssertionError(
                "chromium exited: " + "\n".join(self.stderr[-30:])))

    async def open(self, url: str, init_script: str | None = None) -> Page:
        """A new tab with the network and runtime recorded, navigated to ``url``;
        ``init_script`` runs in the page before its own scripts (to watch what they make)."""
        assert self.session is not None
        http = self.browser_url.replace("ws://", "http://").split("/devtools/")[0]
        async with self.session.put(f"{http}/json/new?about:blank") as r:
            target = await r.json(content_type=None)
        ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws)
        self._tasks.append(asyncio.create_task(self._listen(page)))
        for domain in ("Network", "Runtime", "Page"):
            await page.send(f"{domain}.enable")
        if init_script is not None:
            await page.send("Page.addScriptToEvaluateOnNewDocument", source=init_script)
        await page.send("Page.navigate", url=url)
        return page

    async def _listen(self, page: Page) -> None:
        async for msg in page.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                page.on(json.loads(msg.data))

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
