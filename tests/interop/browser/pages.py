"""The web site the browser tests load: one page per client, the SDKs' files from npm
(tests/interop/node/node_modules), and the settings each SDK would fetch from its vendor's
CDN, served here instead (Segment's project settings, RudderStack's source config).

Each page loads its SDK, points it at the agent, sends the events of ``EVENTS`` and sets
``window.SENT = true``; a test then waits for them at the fake upstream.
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path
from typing import Any

from aiohttp import web

# Resolved: a worktree may link it to another checkout's, and served files are resolved too.
NODE_MODULES = (Path(__file__).resolve().parent.parent / "node" / "node_modules").resolve()
KEY = "browserKey1"

# What every page sends, so each test checks the same fields.
USER = "user-42"
TRAITS = {"email": "ada@example.com", "name": "Ada", "plan": "pro"}
PROPS = {"button": "buy", "price": 9.5, "tags": ["a", "b"], "nested": {"deep": True}}

HEAD = '<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">'


def _run(setup: str, send: str) -> str:
    """A classic script: ``setup`` yields the client, ``send`` uses it; errors are logged."""
    return f"""<script>
window.CFG = __CFG__;
(async () => {{
  {setup}
  {send}
  window.SENT = true;
}})().catch((e) => {{ console.error("FAILED " + (e && e.stack || e)); window.FAILED = String(e); }});
</script>"""


SEGMENT = HEAD + '<script src="/nm/@segment/analytics-next/dist/umd/index.js"></script>' + _run(
    """const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(
      {writeKey: CFG.key, cdnURL: CFG.site}, {retryQueue: true});""",
    """await analytics.identify(CFG.user, CFG.traits);
  await analytics.track("Clicked", CFG.props);
  await analytics.page("Docs", "Intro", {path: "/docs"});""")

RUDDERSTACK = HEAD + (
    '<script src="/nm/@rudderstack/analytics-js/dist/npm/modern/bundled/umd/index.js"></script>'
) + _run(
    """const analytics = new rudderanalytics.RudderAnalytics();
  await new Promise((resolve) => {
    analytics.load(CFG.key, CFG.agent, {configUrl: CFG.site, useBeacon: CFG.beacon,
      beaconQueueOptions: {maxItems: 3, flushQueueInterval: 200}, polyfillIfRequired: false,
      destSDKBaseURL: CFG.site + "/rudder-integrations", pluginsSDKBaseURL: CFG.site + "/rudder-plugins",
      sessions: {autoTrack: false}, onLoaded: resolve});
  });""",
    """analytics.identify(CFG.user, CFG.traits);
  analytics.track("Clicked", CFG.props);
  analytics.page("Docs", "Intro", {path: "/docs"});""")

DITTOFEED = HEAD + """<script type="importmap">{"imports": {
  "@dittofeed/sdk-js-base": "/nm/@dittofeed/sdk-js-base/dist/ejs/index.js",
  "uuid": "/nm/uuid/dist/esm-browser/index.js"}}</script>
<script type="module">
window.CFG = __CFG__;
import { DittofeedSdk } from "/nm/@dittofeed/sdk-web/dist/ejs/index.js";
try {
  await DittofeedSdk.init({writeKey: CFG.key, host: CFG.agent});
  DittofeedSdk.identify({userId: CFG.user, traits: CFG.traits});
  DittofeedSdk.track({userId: CFG.user, event: "Clicked", properties: CFG.props});
  DittofeedSdk.page({userId: CFG.user, name: "Docs", properties: {path: "/docs"}});
  await DittofeedSdk.flush();
  window.SENT = true;
} catch (e) { console.error("FAILED " + (e && e.stack || e)); window.FAILED = String(e); }
</script>"""

# In the body, as the module's device detection needs (clientjs appends to document.body):
# loaded in the head, it logged a TypeError and sent no deviceId, platform or locale.
NUCLEUS = HEAD + '<body><script src="/nm/nucleus-analytics/dist/browser.js"></script>' + _run(
    """Nucleus.init(CFG.key, {endpoint: CFG.agent.replace("http", "ws"), reportInterval: 1,
      disableErrorReports: true});""",
    """Nucleus.setUserId(CFG.user);
  Nucleus.track("Clicked", CFG.props);""")

# A client posting JSON (so the browser sends a preflight) to a route the agent lacks.
UNKNOWN = HEAD + _run(
    """const r = await fetch(CFG.agent + "/v2/nowhere", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({a: 1})});""",
    """window.RESULT = {status: r.status, body: await r.json()};""")

PAGES = {"segment": SEGMENT, "rudderstack": RUDDERSTACK, "dittofeed": DITTOFEED,
         "nucleus": NUCLEUS, "unknown": UNKNOWN}


def segment_settings(agent: str, strategy: dict[str, Any] | None) -> dict[str, Any]:
    """What cdn.segment.com would answer for the project: only the Segment.io destination,
    pointed at the agent, and no metrics sent to Segment."""
    io: dict[str, Any] = {"apiKey": KEY, "apiHost": agent.split("://", 1)[1] + "/v1",
                          "protocol": "http", "addBundledMetadata": True}
    if strategy is not None:
        io["deliveryStrategy"] = strategy
    return {"integrations": {"Segment.io": io}, "plan": {}, "edgeFunction": {},
            "analyticsNextEnabled": True, "middlewareSettings": {}, "enabledMiddleware": {},
            "metrics": {"sampleRate": 0}, "legacyVideoPluginsEnabled": False,
            "remotePlugins": []}


def rudder_config() -> dict[str, Any]:
    """What RudderStack's control plane would answer: the source, no destinations, and
    neither error reports nor metrics."""
    return {"isHosted": False, "source": {
        "id": "src-1", "name": "outpost-test", "writeKey": KEY, "workspaceId": "ws-1",
        "enabled": True, "destinations": [], "updatedAt": "2026-01-01T00:00:00.000Z",
        "config": {"statsCollection": {"errors": {"enabled": False},
                                       "metrics": {"enabled": False}}}}}


class Site:
    """The pages' origin, on 127.0.0.1 port 0; ``missing`` records what it could not serve."""

    def __init__(self) -> None:
        self.agent = ""
        self.segment_strategy: dict[str, Any] | None = None
        self.beacon = False
        self.missing: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Site:
        app = web.Application()
        app.router.add_get("/page/{name}", self._page)
        app.router.add_get("/nm/{path:.*}", self._module)
        app.router.add_get("/v1/projects/{key}/settings", self._segment_settings)
        app.router.add_get("/sourceConfig/", self._rudder_config)
        app.router.add_route("*", "/{tail:.*}", self._missing)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _page(self, request: web.Request) -> web.Response:
        cfg = {"key": KEY, "site": self.url, "agent": self.agent, "beacon": self.beacon,
               "user": USER, "traits": TRAITS, "props": PROPS}
        html = PAGES[request.match_info["name"]].replace("__CFG__", json.dumps(cfg))
        return web.Response(text=html, content_type="text/html")

    async def _module(self, request: web.Request) -> web.StreamResponse:
        path = (NODE_MODULES / request.match_info["path"]).resolve()
        if NODE_MODULES not in path.parents:
            raise web.HTTPForbidden()
        if not path.is_file() and path.with_name(path.name + ".js").is_file():
            path = path.with_name(path.name + ".js")   # ESM imports without an extension
        if not path.is_file():
            return await self._missing(request)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return web.Response(body=path.read_bytes(), content_type=kind)

    async def _segment_settings(self, request: web.Request) -> web.Response:
        return web.json_response(segment_settings(self.agent, self.segment_strategy))

    async def _rudder_config(self, request: web.Request) -> web.Response:
        return web.json_response(rudder_config())

    async def _missing(self, request: web.Request) -> web.Response:
        self.missing.append(f"{request.method} {request.path_qs}")
        return web.Response(status=404)
