"""The machine description, the results table, and the targets check."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def machine(workdir: Path) -> dict[str, Any]:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(),
            "ram_gb": round(mem_kb / 1024 / 1024, 1), "disk": _disk(workdir),
            "kernel": platform.release(), "python": platform.python_version()}


def _disk(path: Path) -> str:
    """The device and filesystem holding the spool (tmpfs would make fsync free)."""
    best = ("", "", "")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fs = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) >= len(best[1]):
                best = (dev, mnt, fs)
    dev, mnt, fs = best
    rot = ""
    name = os.path.basename(dev)
    sysfs = Path(f"/sys/block/{name}/queue/rotational")
    if sysfs.exists():
        rot = ", rotational" if sysfs.read_text().strip() == "1" else ", non-rotational"
    return f"{dev} {fs} on {mnt}{rot}"


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "MB":
        return f"{value / 1e6:.1f} MB"
    if unit == "ms":
        return f"{value:.1f} ms" if value >= 1 else f"{value:.2f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "x":
        return f"{value:.2f}×"
    return f"{value:,.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "n/a"


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(figure, Outpost, same-run reference and ratio, target, met) rows."""
    out: list[tuple[str, str, str, str, str]] = []
    ing = r.get("ingest", {})
    names = {"single": "single-event HTTP", "batch_nucleus": "100-event batches, Nucleus HTTP",
             "batch_segment": "100-event batches, /v1/batch", "ws": "websocket, 100-event frames"}
    for name, label in names.items():
        w = ing.get(name)
        if not w:
            continue
        a, h, n, o = (w.get(s) or {} for s in ("agent", "hello", "naive", "normal"))
        ev = a.get("events_per_s")
        ref = (f"hello {_fmt(h.get('events_per_s'))} ({_ratio(ev, h.get('events_per_s'))}); "
               f"naive {_fmt(n.get('events_per_s'))} ({_ratio(ev, n.get('events_per_s'))})")
        if o:
            ref += f"; sync=normal {_fmt(o.get('events_per_s'))} ({_ratio(ev, o.get('events_per_s'))})"
        out.append((f"{label}: events/s", _fmt(ev), ref, *_target(name, r)))
        if name != "ws":
            out.append((f"{label}: p50 / p99",
                        f"{_fmt(a.get('p50_ms'), 'ms')} / {_fmt(a.get('p99_ms'), 'ms')}",
                        f"hello p99 {_fmt(h.get('p99_ms'), 'ms')}; naive p99 "
                        f"{_fmt(n.get('p99_ms'), 'ms')}",
                        *(_target(name + "_p99", r) if name.startswith("batch") else ("", ""))))
    d = r.get("drain")
    if d:
        ref_ws = (ing.get("ws") or {}).get("hello", {}).get("events_per_s")
        ag_ws = (ing.get("ws") or {}).get("agent", {}).get("events_per_s")
        out.append((f"drain {d['backlog']:,} backlog: events/s", _fmt(d.get("events_per_s")),
                    f"{_ratio(d.get('events_per_s'), ag_ws)} of ws ingest; "
                    f"{_ratio(d.get('events_per_s'), ref_ws)} of hello ws", *_target("drain", r)))
        out.append(("startup with backlog", _fmt(d.get("startup_backlog_s"), "s"),
                    f"empty spool {_fmt(d.get('startup_empty_s'), 's')} "
                    f"({_ratio(d.get('startup_backlog_s'), d.get('startup_empty_s'))})",
                    *_target("startup", r)))
        out.append(("spool bytes per event", f"{d.get('spool_bytes_per_event', 0):.0f} B",
                    f"raw JSON {d.get('raw_bytes_per_event', 0)} B "
                    f"({_ratio(d.get('spool_bytes_per_event'), d.get('raw_bytes_per_event'))})",
                    *_target("spool", r)))
    m = r.get("memory", {})
    hello_idle = m.get("hello_idle_anon")
    for key, label in (("idle", "RSS idle"), ("ingest", "RSS peak, ingesting"),
                       ("drain", "RSS peak, draining")):
        if key in m:
            total, anon = m[key]
            out.append((f"{label}: total / anon", f"{_fmt(total, 'MB')} / {_fmt(anon, 'MB')}",
                        f"hello idle anon {_fmt(hello_idle, 'MB')} ({_ratio(anon, hello_idle)})",
                        *(_target("rss_" + key, r) if key != "idle" else ("", ""))))
    return out


def _target(name: str, r: dict[str, Any]) -> tuple[str, str]:
    ing = r.get("ingest", {})
    d = r.get("drain") or {}
    m = r.get("memory", {})

    def ev(w: str, s: str = "agent") -> float:
        return float(((ing.get(w) or {}).get(s) or {}).get("events_per_s") or 0)

    def p99(w: str) -> float:
        return float(((ing.get(w) or {}).get("agent") or {}).get("p99_ms") or 1e9)
    checks: dict[str, tuple[str, bool]] = {
        "single": ("≥ 0.70× hello", ev("single") >= 0.7 * ev("single", "hello") > 0),
        "batch_nucleus": ("≥ 200,000", ev("batch_nucleus") >= 200_000),
        "batch_segment": ("≥ 200,000", ev("batch_segment") >= 200_000),
        "batch_nucleus_p99": ("< 50 ms", p99("batch_nucleus") < 50),
        "batch_segment_p99": ("< 50 ms", p99("batch_segment") < 50),
        "ws": ("≥ 200,000", ev("ws") >= 200_000),
        "drain": ("≥ 100,000", (d.get("events_per_s") or 0) >= 100_000),
        "startup": ("< 1 s", 0 < (d.get("startup_backlog_s") or 9) < 1.0),
        "spool": ("≤ 1.2× raw", (d.get("spool_bytes_per_event") or 1e9)
                  <= 1.2 * (d.get("raw_bytes_per_event") or 0)),
        "rss_ingest": ("anon < 60 MB", 0 < m.get("ingest", (0, 1e9))[1] < 60e6),
        "rss_drain": ("anon < 60 MB", 0 < m.get("drain", (0, 1e9))[1] < 60e6),
    }
    text, ok = checks[name]
    return text, "yes" if ok else "**no**"


def table(r: dict[str, Any]) -> str:
    head = ("figure", "Outpost", "same-run reference (ratio)", "target", "met")
    body = rows(r)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in body]
    return "\n".join(lines)
