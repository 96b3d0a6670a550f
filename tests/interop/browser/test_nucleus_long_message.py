"""A Nucleus queue over 4 MiB sent by Chromium's own WebSocket, as nucleus-nodejs and
nucleus-analytics send it from an Electron renderer or a browser page: Chromium writes a
long message as 131,000-byte fragments. Each tick the page sends its whole queue and drops
the events whose ids come back, as the modules do; the queue drains, each event stored
once (it was closed with 1009 at every tick, and nothing arrived).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.interop.browser.cdp import Chromium
from tests.interop.browser.pages import KEY, NODE_MODULES, Site

pytestmark = pytest.mark.interop

# The module's tick, run in the page: the whole queue in one message, the ids that come
# back dropped; the ticks it took, or why it stopped.
DRAIN = """(async () => {
  let queue = [];
  for (let i = 0; i < 14000; i++) {
    queue.push({type: "event", name: "e" + i, id: Math.floor(Math.random() * 1e6) + 1,
                date: 1767323045000 + i, sessionId: 4242, deviceId: "d",
                payload: {i: i, label: "x".repeat(300)}});
  }
  const size = JSON.stringify({data: queue}).length;
  const ws = new WebSocket(AGENT.replace("http", "ws") + "/app/" + KEY + "/track");
  await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = fail; });
  let ticks = 0;
  while (queue.length && ticks < 10) {
    ticks++;
    const reply = await new Promise((ok) => {
      ws.onmessage = (m) => ok(JSON.parse(m.data));
      ws.onclose = (e) => ok({closed: e.code, reason: e.reason});
      ws.send(JSON.stringify({data: queue}));
    });
    if (!reply.reportedIds) return {ticks, size, reply, left: queue.length};
    queue = queue.filter((e) => !reply.reportedIds.includes(e.id));
  }
  ws.close();
  return {ticks, size, left: queue.length};
})()"""


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    if not (NODE_MODULES / "nucleus-analytics").exists():
        pytest.fail("run `npm ci --prefix tests/interop/node` first")
    s = await Site().start()
    yield s
    await s.stop()


async def test_a_queue_over_4_mib_from_chromium_drains(make_agent: Any, site: Site,
                                                       chromium: str, tmp_path: Path) -> None:
    agent = await make_agent(listen={"allowed_origins": [site.url]})
    site.agent = f"http://127.0.0.1:{agent.port}"
    async with Chromium(chromium, tmp_path / "profile") as browser:
        page = await browser.open(f"{site.url}/page/unknown")
        script = (f"const AGENT = {orjson.dumps(site.agent).decode()}; "
                  f"const KEY = {orjson.dumps(KEY).decode()}; " + DRAIN)
        got = await page.evaluate(script)
    assert got["size"] > 5 * 1024 * 1024, got
    assert got["left"] == 0 and "reply" not in got, got
    assert got["ticks"] > 1, got   # not taken whole: over 4 MiB
    assert agent.spool.depth == 14_000
