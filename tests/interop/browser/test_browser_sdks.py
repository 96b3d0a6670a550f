"""Real browser SDKs from npm, in headless Debian chromium, on a page whose origin is in
listen.allowed_origins: every event reaches the fake upstream with its name, properties,
ids and traits, nothing is refused, and no CDN is contacted (the SDKs' settings and
files are served by the test's own site, tests/interop/browser/pages.py).

- `@segment/analytics-next`, default (one request per call) and batching (`/v1/b`);
- `@rudderstack/analytics-js`, XHR and `useBeacon` (`/beacon/v1/batch?writeKey=`);
- `@dittofeed/sdk-web` (`/api/public/apps/batch`);
- the `nucleus-analytics` browser build (websocket).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.interop.browser.cdp import Chromium, Page
from tests.interop.browser.pages import KEY, NODE_MODULES, PROPS, TRAITS, USER, Site
from tests.segment_helpers import fill_spool, nucleus_up, segment_up

pytestmark = pytest.mark.interop
TIMEOUT_S = 20.0


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    if not (NODE_MODULES / "@segment" / "analytics-next").exists():
        pytest.fail("run `npm ci --prefix tests/interop/node` first")
    s = await Site().start()
    yield s
    await s.stop()


async def until(cond: Callable[[], bool], page: Page) -> None:
    """Return once ``cond()`` holds; fail at once when the page failed, else after
    TIMEOUT_S, with everything the page did."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while not cond():
        if page.errors or any(line.startswith("error FAILED") for line in page.console):
            raise AssertionError("the page failed\n" + page.report())
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("events did not arrive in time\n" + page.report())
        await asyncio.sleep(0.02)


async def run_page(chromium: str, tmp_path: Path, site: Site, agent: Any, name: str,
                   arrived: Callable[[], bool]) -> Page:
    """Load page ``name``; return once ``arrived()``, checking that the page stayed on
    127.0.0.1 and that the agent refused nothing."""
    site.agent = f"http://127.0.0.1:{agent.port}"
    async with Chromium(chromium, tmp_path / "profile") as browser:
        page = await browser.open(f"{site.url}/page/{name}")
        await until(arrived, page)
        assert await page.evaluate("window.SENT === true"), page.report()
    local = (site.url + "/", site.agent + "/", site.agent.replace("http", "ws") + "/")
    assert all(r.split(" ", 1)[1].startswith(local) for r in page.requests), page.report()
    assert site.missing == [], page.report()
    assert agent.sink.metrics.refusals() == {}, page.report()
    return page


def by_type(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for ev in events:
        assert ev["type"] not in out, events
        out[ev["type"]] = ev
    return out


def check_segment_events(events: list[dict[str, Any]], library: str) -> None:
    """identify, track and page, each with the fields the page gave it."""
    got = by_type(events)
    assert set(got) == {"identify", "track", "page"}, events
    identify, track, page = got["identify"], got["track"], got["page"]
    # RudderStack sends an identify's traits in `context.traits`, as it always has.
    traits = identify.get("traits", identify["context"].get("traits"))
    assert identify["userId"] == USER and traits == TRAITS, identify
    assert track["event"] == "Clicked" and track["properties"] == PROPS, track
    assert track["userId"] == USER, track
    assert page["name"] == "Intro" and page["properties"]["path"] == "/docs", page
    assert len({e["messageId"] for e in events}) == 3
    assert len({e["anonymousId"] for e in events}) == 1 and events[0]["anonymousId"]
    assert all(e["context"]["library"]["name"] == library for e in events), events
    assert all(e["context"]["page"]["url"].endswith("/page/" + name_of(library))
               for e in events if "page" in e["context"]), events


def name_of(library: str) -> str:
    return "rudderstack" if "rudder" in library.lower() else "segment"


@pytest.mark.parametrize("strategy", [None, {"strategy": "batching",
                                             "config": {"size": 3, "timeout": 200}}],
                         ids=["default", "batching"])
async def test_segment_analytics_next(make_agent: Any, fake_segment: FakeSegment, site: Site,
                                      chromium: str, tmp_path: Path,
                                      strategy: dict[str, Any] | None) -> None:
    site.segment_strategy = strategy
    agent = await make_agent(upstreams=[segment_up(fake_segment)],
                             listen={"allowed_origins": [site.url]})
    page = await run_page(chromium, tmp_path, site, agent, "segment",
                          lambda: len(fake_segment.events) >= 3)
    check_segment_events(fake_segment.events, "analytics.js")
    assert {r.write_key for r in fake_segment.requests} == {KEY}
    posted = {r.split(" ", 1)[1].split("?")[0].removeprefix(site.agent)
              for r in page.requests if r.startswith("POST ")}
    assert posted == ({"/v1/b"} if strategy else {"/v1/i", "/v1/t", "/v1/p"}), page.report()


# What the page's own code reads of each reply (the SDK calls the page's fetch at each send).
SEEN_REPLIES = """window.SEEN = []; const pageFetch = window.fetch;
window.fetch = async (...args) => { const r = await pageFetch(...args);
  window.SEEN.push([r.status, r.headers.get("Retry-After")]); return r; };"""


async def test_segment_batching_waits_out_a_full_spool(make_agent: Any, fake_segment: FakeSegment,
                                                       site: Site, chromium: str, tmp_path: Path,
                                                       fast_backoff: Any) -> None:
    """The spool full, a batch is a 429 with Retry-After, which analytics-next's batching
    waits out without counting a try; a try it counts (on a status alone, as when it cannot
    read a Retry-After) is its last with `maxRetries: 0`, and its events are lost. A page on
    another origin reads only the headers CORS exposes to it: room is made after its second
    refusal, and its events must still arrive."""
    site.segment_strategy = {"strategy": "batching",
                             "config": {"size": 3, "timeout": 200, "maxRetries": 0}}
    fake_segment.outage = (503, None)
    agent = await make_agent(upstreams=[segment_up(fake_segment)],
                             listen={"allowed_origins": [site.url]},
                             storage={"max_size_mb": 1, "full_retry_after_s": 1})
    await fill_spool(agent.port)

    def too_many() -> int:
        return agent.sink.metrics.refusals().get("segment", {}).get("429", 0)

    filled = too_many()   # the filler's own batch

    def the_pages() -> list[dict[str, Any]]:
        return [e for e in fake_segment.events if e.get("anonymousId")]   # not the filler's

    site.agent = f"http://127.0.0.1:{agent.port}"
    async with Chromium(chromium, tmp_path / "profile") as browser:
        page = await browser.open(f"{site.url}/page/segment", SEEN_REPLIES)
        try:
            await until(lambda: too_many() >= filled + 2, page)
            fake_segment.outage = None   # the queue drains: room is made
            await until(lambda: len(the_pages()) >= 3, page)
        finally:
            seen = await page.evaluate("window.SEEN")
            print("the page read (status, Retry-After):", seen)
    assert [429, "1"] in seen, seen
    check_segment_events(the_pages(), "analytics.js")


@pytest.mark.parametrize("beacon", [False, True], ids=["xhr", "beacon"])
async def test_rudderstack_analytics_js(make_agent: Any, fake_segment: FakeSegment, site: Site,
                                        chromium: str, tmp_path: Path, beacon: bool) -> None:
    site.beacon = beacon
    agent = await make_agent(upstreams=[segment_up(fake_segment)],
                             listen={"allowed_origins": [site.url]})
    page = await run_page(chromium, tmp_path, site, agent, "rudderstack",
                          lambda: len(fake_segment.events) >= 3)
    check_segment_events(fake_segment.events, "RudderLabs JavaScript SDK")
    assert {r.write_key for r in fake_segment.requests} == {KEY}
    posted = {r.split(" ", 1)[1].removeprefix(site.agent)
              for r in page.requests if r.startswith("POST ")}
    if beacon:
        assert posted == {f"/beacon/v1/batch?writeKey={KEY}"}, page.report()
    else:
        assert posted == {"/v1/identify", "/v1/track", "/v1/page"}, page.report()


async def test_dittofeed_sdk_web(make_agent: Any, fake_segment: FakeSegment, site: Site,
                                 chromium: str, tmp_path: Path) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)],
                             listen={"allowed_origins": [site.url]})
    await run_page(chromium, tmp_path, site, agent, "dittofeed",
                   lambda: len(fake_segment.events) >= 3)
    got = by_type(fake_segment.events)
    assert set(got) == {"identify", "track", "page"}, fake_segment.events
    assert got["identify"]["traits"] == TRAITS
    assert got["track"]["event"] == "Clicked" and got["track"]["properties"] == PROPS
    assert got["page"]["name"] == "Docs" and got["page"]["properties"] == {"path": "/docs"}
    assert {e["userId"] for e in fake_segment.events} == {USER}
    assert len({e["messageId"] for e in fake_segment.events}) == 3
    assert {r.write_key for r in fake_segment.requests} == {KEY}


async def test_nucleus_analytics_browser_build(make_agent: Any, fake_nucleus: FakeNucleus,
                                               site: Site, chromium: str,
                                               tmp_path: Path) -> None:
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)],
                             listen={"allowed_origins": [site.url]})
    page = await run_page(chromium, tmp_path, site, agent, "nucleus",
                          lambda: any(e.get("name") == "Clicked" for e in fake_nucleus.events))
    # The module detected the device as on a real page (it logs what it could not).
    assert not [line for line in page.console if line.startswith("error")], page.report()
    clicked = next(e for e in fake_nucleus.events if e.get("name") == "Clicked")
    assert clicked["payload"] == PROPS and clicked["userId"] == USER, clicked
    # Newer modules name the device by deviceId and anonId, with no machineId, and
    # integer epoch milliseconds for a date.
    assert clicked["deviceId"] and clicked["anonId"] and "machineId" not in clicked, clicked
    assert type(clicked["date"]) is int, clicked
    assert [e["type"] for e in fake_nucleus.events][:1] == ["init"], fake_nucleus.events
    assert set(fake_nucleus.paths) == {f"/app/{KEY}/track"}


async def test_a_page_posting_to_an_unknown_route_reads_the_404(make_agent: Any, site: Site,
                                                                chromium: str,
                                                                tmp_path: Path) -> None:
    """Not a CORS error, which a client cannot tell from the agent being down: the
    preflight passes, the page reads the JSON 404, and the agent counts it."""
    agent = await make_agent(listen={"allowed_origins": [site.url]})
    site.agent = f"http://127.0.0.1:{agent.port}"
    async with Chromium(chromium, tmp_path / "profile") as browser:
        page = await browser.open(f"{site.url}/page/unknown")
        await until(lambda: agent.sink.metrics.refusals() != {}, page)
        result = await page.evaluate(
            "new Promise((ok) => { const t = setInterval(() => { if (window.RESULT) {"
            " clearInterval(t); ok(window.RESULT); } }, 10); })")
    said = "no route for POST /v2/nowhere"
    assert result == {"status": 404, "body": {"error": said, "code": "not_found", "message": said}}
    assert agent.sink.metrics.refusals() == {"unrouted": {"404": 1}}
    assert sorted(page.requests[1:]) == [f"OPTIONS {site.agent}/v2/nowhere",  # preflight
                                         f"POST {site.agent}/v2/nowhere"], page.report()
