"""The status page at GET /, loaded in headless Chromium against a busy agent.

Chromium runs as a subprocess with --dump-dom after a virtual time budget,
so the page's script has fetched /status and drawn everything; its figures
are read back from the DOM's data attributes and compared with /status.
Set OUTPOST_DOCS_SCREENSHOT=1 to refresh docs/status-page.png.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT, run_chromium
from tests.fakes.ops_scene import LIVE, QUEUED, REFUSED, Scene, populate, settled

WIDTH, HEIGHT = 1280, 900


class Figures(HTMLParser):
    """data-value attributes: by element id, per upstream row and field, per drop reason,
    per refused (API, status), per dead-letter (reason, upstream)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.upstreams: dict[str, dict[str, str]] = {}
        self.drops: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        self.dead: dict[str, str] = {}
        self._row: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and "data-upstream" in a:
            self._row = ("upstream", a["data-upstream"])
            self.upstreams[a["data-upstream"]] = {}
        elif tag == "tr" and "data-reason" in a:
            self._row = ("drop", a["data-reason"])
        elif tag == "tr" and "data-refused" in a:
            self._row = ("refused", a["data-refused"])
        elif tag == "tr" and "data-dead" in a:
            self._row = ("dead", a["data-dead"])
        elif tag == "td" and "data-field" in a and self._row is not None:
            kind, name = self._row
            if kind == "upstream":
                self.upstreams[name][a["data-field"]] = a["data-value"]
            else:
                {"drop": self.drops, "refused": self.refused, "dead": self.dead}[kind][name] = \
                    a["data-value"]
        elif "id" in a and "data-value" in a:
            self.by_id[a["id"]] = a["data-value"]


def figures(dom: str) -> Figures:
    parser = Figures()
    parser.feed(dom)
    return parser


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_page_in_chromium_matches_status(make_agent: Any, chromium: str,
                                               tmp_path: Path) -> None:
    async with Scene() as scene:
        agent = await make_agent(upstreams=scene.upstreams())
        await populate(agent.port)
        await settled(agent)
        url = f"http://127.0.0.1:{agent.port}/"
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "app/k/track", data=b"not json") as r:
                assert r.status == 400
        dom = await run_chromium(chromium, tmp_path / "p1", "--virtual-time-budget=3000",
                                 "--dump-dom", url)
        shot = tmp_path / "status.png"
        await run_chromium(chromium, tmp_path / "p2", "--virtual-time-budget=3000",
                           f"--window-size={WIDTH},{HEIGHT}", f"--screenshot={shot}", url)
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "status") as r:
                status = await r.json()

    page = figures(dom)
    assert page.by_id["queue-depth"] == str(status["queue_depth"]) == str(QUEUED)
    assert page.by_id["ingested"] == str(LIVE + REFUSED + QUEUED)
    assert page.by_id["acked"] == str(status["counters"]["acked"]) == str(LIVE)
    assert page.by_id["spool-used"] == str(status["spool"]["used_bytes"])
    assert float(page.by_id["oldest-age"]) >= 0
    assert page.by_id["sync-profile"] == status["sync"]["profile"] == "normal"
    assert page.by_id["hour-in"] == str(sum(m["in"] for m in status["history"]))
    assert page.by_id["hour-out"] == str(sum(m["out"] for m in status["history"])) == str(LIVE)
    assert page.drops == {k: str(v) for k, v in status["drops"].items()}
    assert page.drops["dead_lettered"] == str(REFUSED)
    assert page.refused == {f"{api} {code}": str(n) for api, by in
                            status["ingest"]["refused"].items() for code, n in by.items()}
    assert page.refused == {"nucleus 400": "1"}
    assert page.by_id["dead-count"] == str(status["dead_letters"]) == str(REFUSED)
    assert page.dead == {f"{g['reason']} | {g['upstream']}": str(g["count"])
                         for g in status["dead_reasons"]}
    assert page.dead == {'HTTP 400: {"error": "refused by the test"} | strict': str(REFUSED)}
    assert list(page.upstreams) == [u["name"] for u in status["upstreams"]]
    for u in status["upstreams"]:
        shown = page.upstreams[u["name"]]
        for field in ("state", "queue_depth", "queue_bytes", "acked", "retries"):
            assert shown[field] == str(u[field]), (u["name"], field)
        assert shown["last_error"] == (u["last_error"] or "")
        assert shown["last_ack"] == ("" if u["last_ack"] is None else str(u["last_ack"]))
    assert page.upstreams["down"]["state"] == "backoff"
    assert page.upstreams["live"]["last_ack"] != ""
    assert "<polyline" in dom and 'class="in"' in dom    # the chart was drawn

    data = shot.read_bytes()
    assert png_size(data) == (WIDTH, HEIGHT)
    assert len(data) > 20_000, "a blank page compresses to a few KB"
    if os.environ.get("OUTPOST_DOCS_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / "docs" / "status-page.png")


async def test_page_headers_and_self_containment(make_agent: Any) -> None:
    agent = await make_agent()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            csp = r.headers["Content-Security-Policy"]
            html = await r.text()
            assert r.headers["X-Content-Type-Options"] == "nosniff"
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'" and directives["connect-src"] == "'self'"
    assert "unsafe" not in csp
    for tag in ("script", "style"):
        body = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
        assert body is not None
        digest = base64.b64encode(hashlib.sha256(body[1].encode()).digest()).decode()
        assert directives[f"{tag}-src"] == f"'sha256-{digest}'"
    # No external assets: nothing fetched but /status.
    assert not re.search(r"\b(src|href)\s*=|url\(|@import", html)
    assert re.findall(r"fetch\(\"([^\"]+)\"", html) == ["/status"]


@pytest.mark.parametrize("path", ["/", "/status", "/metrics"])
async def test_only_loopback_origins(make_agent: Any, path: str) -> None:
    agent = await make_agent()
    url = f"http://127.0.0.1:{agent.port}{path}"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        async with s.get(url, headers={"Host": "evil.example"}) as r:
            assert r.status == 421    # DNS rebinding: a foreign name for our address
        async with s.get(url, headers={"Origin": f"http://127.0.0.1:{agent.port}"}) as r:
            assert r.status == 200    # the page's own requests


async def test_the_page_lists_what_went_wrong_off_the_ingest_path(
        make_agent: Any, chromium: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed battery readings and a damaged write-ahead log, shown in /status and by
    `outpost status`, are on the page too; a healthy agent's page lists nothing."""
    import psutil

    from tests.test_wal_damage import HEADER, crash_image, flip

    healthy = await make_agent(spool=tmp_path / "healthy.db")
    dom = await run_chromium(chromium, tmp_path / "p0", "--virtual-time-budget=3000",
                             "--dump-dom", f"http://127.0.0.1:{healthy.port}/")
    assert 'id="problems-section" hidden' in dom and "data-problem" not in dom

    def broken() -> None:
        raise OSError("no such file: /sys/class/power_supply/BAT0/capacity")
    monkeypatch.setattr(psutil, "sensors_battery", broken)
    image = await crash_image(tmp_path)
    flip(Path(f"{image}-wal"), HEADER + 24 + 100)
    agent = await make_agent(spool=image,
                             sync={"on_low_battery": "hold", "low_battery_pct": 20})
    dom = await run_chromium(chromium, tmp_path / "p1", "--virtual-time-budget=3000",
                             "--dump-dom", f"http://127.0.0.1:{agent.port}/")
    found = {k: (n, text) for k, n, text in re.findall(
        r'<li data-problem="(\w+)" data-value="(\d+)">([^<]*)</li>', dom)}
    assert set(found) == {"sync", "wal_damaged"}, dom
    assert found["sync"][0] == "1" and "BAT0/capacity" in found["sync"][1]
    assert found["wal_damaged"][0] == "1" and "write-ahead log" in found["wal_damaged"][1]
    assert 'id="problems-section" hidden' not in dom
