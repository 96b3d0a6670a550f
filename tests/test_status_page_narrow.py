"""Issue 14 §4: the status page at 420 px wide (a phone, a narrow split) has no horizontal
overflow, and the chart's legend names what its figures are (hourly totals)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.fakes.ops_scene import Scene, populate, settled
from tests.interop.browser.cdp import Chromium

NARROW = 420
# Elements whose right edge passes the viewport (but for those inside a box that scrolls
# sideways itself, as a wide table in its card does), and the page's scroll width.
OVERFLOW = """(() => {
  const w = document.documentElement.clientWidth;
  const scrolls = e => { for (let a = e.parentElement; a && a !== document.body; a = a.parentElement)
    if (['auto', 'scroll'].includes(getComputedStyle(a).overflowX)) return true; return false; };
  const wide = [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > w + 0.5 && !scrolls(e))
    .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + (e.className && typeof e.className === 'string' ? '.' + e.className : ''));
  return {client: w, scroll: document.documentElement.scrollWidth, wide: wide.slice(0, 10)};
})()"""


async def test_the_status_page_fits_420_px(make_agent: Any, chromium: str, tmp_path: Path) -> None:
    async with Scene() as scene:
        agent = await make_agent(upstreams=scene.upstreams())
        await populate(agent.port)
        await settled(agent)
        async with Chromium(chromium, tmp_path / "profile") as browser:
            page = await browser.open("about:blank")
            await page.send("Emulation.setDeviceMetricsOverride", width=NARROW, height=900,
                            deviceScaleFactor=1, mobile=True)
            await page.send("Page.navigate", url=f"http://127.0.0.1:{agent.port}/")
            for _ in range(300):   # until the page has drawn the upstream rows (15 s at most)
                if await page.evaluate("document.querySelectorAll('#upstreams tr').length") > 0:
                    break
                await asyncio.sleep(0.05)
            layout = await page.evaluate(OVERFLOW)
            legend = await page.evaluate("document.querySelector('.legend').textContent")
            label = await page.evaluate("document.getElementById('chart').getAttribute('aria-label')")
    assert layout["client"] == NARROW
    assert layout["scroll"] <= NARROW and layout["wide"] == [], layout
    assert "per minute" not in legend and "last hour" in legend, legend
    assert "per minute" in label, label   # the chart itself plots events per minute
