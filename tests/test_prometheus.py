"""GET /metrics: parsed by a strict reader of the text exposition format 0.0.4."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from agent.metrics import Histogram
from agent.ops.prometheus import Exposition
from agent.outcomes import Drop, Tally
from tests.conftest import ROOT
from tests.fakes.ops_scene import LIVE, QUEUED, REFUSED, Scene, populate, settled

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
SAMPLE = re.compile(rf"(?P<name>{NAME})(?:\{{(?P<labels>(?:{LABEL},?)*)\}})? (?P<value>\S+)")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}

Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Family:
    kind: str = ""
    help: str = ""
    samples: dict[Key, float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)


def _float(text: str) -> float:
    assert re.fullmatch(r"[+-]?(Inf|NaN|\d+(\.\d*)?([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?)",
                        text), f"bad value {text!r}"
    return float(text)


def parse(text: str) -> dict[str, Family]:
    """Families by name; fails on anything the format does not allow or advise against."""
    assert text.endswith("\n") and "\n\n" not in text, "no blank lines, ends with a newline"
    families: dict[str, Family] = {}
    current = ""
    for line in text.splitlines():
        if m := re.fullmatch(rf"# (HELP|TYPE) ({NAME}) (.*)", line):
            name = m[2]
            fam = families.setdefault(name, Family())
            if name != current:
                assert not fam.samples, f"{name}: family not contiguous"
                current = name
            if m[1] == "TYPE":
                assert not fam.kind and m[3] in TYPES, f"bad or repeated TYPE: {line}"
                fam.kind = m[3]
            else:
                assert not fam.help, f"repeated HELP: {line}"
                fam.help = m[3]
            continue
        assert not line.startswith("#"), f"stray comment: {line}"
        m = SAMPLE.fullmatch(line)
        assert m, f"bad sample line: {line!r}"
        fam = families[current]
        assert fam.kind and fam.help, f"{current}: samples before HELP and TYPE"
        assert m["name"] in {current + s for s in SUFFIXES.get(fam.kind, ("",))}, line
        labels = tuple(sorted((k, _unescape(v)) for k, v in re.findall(LABEL, m["labels"] or "")))
        key = (m["name"], labels)
        assert key not in fam.samples, f"duplicate sample: {line}"
        fam.samples[key] = _float(m["value"])
    for name, fam in families.items():
        if fam.kind == "histogram":
            _check_histogram(name, fam)
    return families


def _check_histogram(name: str, fam: Family) -> None:
    buckets = [(float(dict(labels)["le"]), v) for (n, labels), v in fam.samples.items()
               if n == name + "_bucket"]
    bounds = [b for b, _ in buckets]
    assert bounds == sorted(bounds) and bounds[-1] == math.inf, "le ascending, ending at +Inf"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert counts[-1] == fam.value(name + "_count")
    assert fam.value(name + "_sum") >= 0


def test_exposition_escapes_and_formats() -> None:
    out = Exposition(prefix="t_")
    out.gauge("g", "help with \\ and\nnewline", 1.5, path='a "quoted"\\\nname')
    hist = Histogram(bounds=(0.1, 1.0), counts=[0, 0, 0])
    for v in (0.05, 0.1, 0.5, 7.0):
        hist.observe(v)
    out.histogram("h", "a histogram", hist)
    text = out.text()
    assert "# HELP t_g help with \\\\ and\\nnewline\n" in text
    fams = parse(text)
    assert fams["t_g"].value("t_g", path='a "quoted"\\\nname') == 1.5
    h = fams["t_h"]
    assert [h.value("t_h_bucket", le=le) for le in ("0.1", "1", "+Inf")] == [2, 3, 4]
    assert h.value("t_h_count") == 4 and h.value("t_h_sum") == pytest.approx(7.65)


async def test_metrics_match_status(make_agent: Any) -> None:
    async with Scene() as scene:
        agent = await make_agent(upstreams=scene.upstreams())
        await populate(agent.port)
        await settled(agent)
        async with aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{agent.port}"
            async with s.get(f"{base}/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                fams = parse(await r.text())
            async with s.get(f"{base}/status") as r:
                status = await r.json()

    def one(name: str, **labels: str) -> float:
        return fams["outpost_" + name].value("outpost_" + name, **labels)

    assert one("queue_events") == status["queue_depth"] == QUEUED
    assert one("events_ingested_total") == LIVE + REFUSED + QUEUED
    assert one("events_acked_total") == LIVE
    assert one("events_dropped_total", reason="dead_lettered") == REFUSED
    for reason in ("expired", "dropped_full", "rejected_full", "rejected_storage_error"):
        assert one("events_dropped_total", reason=reason) == 0
    assert one("oldest_event_age_seconds") >= 0
    assert one("spool_bytes") == status["spool"]["used_bytes"] > 0
    by_name = {u["name"]: u for u in status["upstreams"]}
    assert by_name["down"]["state"] == "backoff" and by_name["down"]["last_error"] == (
        "HTTP 503: {\"error\": \"refused by the test\"}; next try in 3600s, as its Retry-After asks")
    for name, u in by_name.items():
        assert one("upstream_queue_events", upstream=name) == u["queue_depth"]
        assert one("upstream_queue_bytes", upstream=name) == u["queue_bytes"]
        assert one("upstream_retries_total", upstream=name) == u["retries"]
        assert one("upstream_acked_total", upstream=name) == u["acked"]
        assert one("upstream_dead_lettered_total", upstream=name) == u["dead_lettered"]
        states = {s: one("upstream_state", upstream=name, state=s)
                  for s in ("idle", "sending", "backoff", "restarting")}
        assert states[u["state"]] == 1 and sum(states.values()) == 1
    assert one("upstream_queue_events", upstream="down") == QUEUED
    assert one("upstream_dead_lettered_total", upstream="strict") == REFUSED
    assert one("upstream_retries_total", upstream="down") == 1
    assert one("upstream_last_ack_timestamp_seconds", upstream="live") == by_name["live"]["last_ack"]
    assert ("outpost_upstream_last_ack_timestamp_seconds", (("upstream", "down"),)) not in \
        fams["outpost_upstream_last_ack_timestamp_seconds"].samples
    latency = fams["outpost_ingest_latency_seconds"]
    assert latency.kind == "histogram"
    assert latency.value("outpost_ingest_latency_seconds_count") == LIVE + REFUSED + QUEUED
    for fam in fams.values():
        assert fam.help and fam.kind in ("counter", "gauge", "histogram")
    documented = set(re.findall(r"`(outpost_\w+)", (ROOT / "docs" / "operations.md").read_text()))
    assert set(fams) <= documented, set(fams) - documented


async def test_every_outcome_is_exported_with_its_help(make_agent: Any) -> None:
    agent = await make_agent()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/metrics") as r:
            fams = parse(await r.text())
    for tally in Tally:
        fam = fams["outpost_" + tally.metric]
        assert fam.kind == "counter" and fam.help == tally.help
        assert fam.value("outpost_" + tally.metric) == 0
    dropped = fams["outpost_events_dropped_total"]
    for reason in Drop:
        assert dropped.value("outpost_events_dropped_total", reason=reason) == 0
        assert f"{reason} ({reason.help})" in dropped.help
