"""`outpost status` as a readable table."""

from __future__ import annotations

from typing import Any


def _age(seconds: Any) -> str:
    if seconds is None:
        return "-"
    s = float(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.1f}{unit}"
    return f"{s:.0f}s"


def render(data: dict[str, Any]) -> str:
    lines = [f"source:       {data.get('source', '?')}",
             f"queue depth:  {data.get('queue_depth', data.get('depth', 0))}"]
    if data.get("oldest_event_age_s") is not None:
        lines.append(f"oldest event: {_age(data['oldest_event_age_s'])} old")
    ups = data.get("upstreams") or []
    if ups:
        lines.append("")
        lines.append(f"{'UPSTREAM':12} {'PROTOCOL':13} {'STATE':8} {'QUEUED':>8} {'ACKED':>8} "
                     f"{'RETRIES':>7}  LAST ERROR")
        for u in ups:
            lines.append(f"{u['name']:12} {u['protocol']:13} {u['state']:8} {u['queue_depth']:>8} "
                         f"{u['acked']:>8} {u['retries']:>7}  {u.get('last_error') or '-'}")
    counters = data.get("counters") or {}
    if counters:
        lines.append("")
        lines.append("counters: " + ", ".join(f"{k}={v}" for k, v in counters.items()))
    return "\n".join(lines)
