"""`outpost status` as a readable table, from a status snapshot (live or offline).

A live snapshot is whatever answers /status on the agent's port (another local program
may): every line is shown escaped (``printable``), each cell before the table measures it,
and a value of an upstream's or app's (a name, a reason) with its backslashes doubled too."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.forwarder.state import NEXT_TRY
from agent.outcomes import Tally
from agent.terminal import printable, printable_value
from agent.uplinks.registry import over_websocket

if TYPE_CHECKING:   # the snapshot's shapes only: the table needs no spool
    from agent.ops.status import Snapshot, UpstreamStatus

# An upstream's error can be a long exception text; the table keeps one line per
# upstream (and the Retry-After wait it ends with: _error), and `--json` has it whole.
ERROR_WIDTH = 72


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, float(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.1f}{unit}"
    return f"{s:.0f}s"


def size(n: float) -> str:
    units = ("B", "KB", "MB", "GB")
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{value:.0f} B" if i == 0 else f"{value:.1f} {units[i]}"


def table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Columns as wide as their widest cell; ``right`` holds the numeric columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def _clip(text: str, shown: Callable[[str], str] = printable) -> str:
    """An error's text on one line, its control characters escaped, cut short. An upstream's
    (``shown``: printable_value) as `outpost dead list` shows it; the agent's own keeps its
    quotes' and paths' backslashes as they are."""
    text = shown(" ".join(text.split()))
    return text if len(text) <= ERROR_WIDTH else text[:ERROR_WIDTH - 1] + "…"


def _error(text: str) -> str:
    """An upstream's last error, cut as _clip cuts it, but for the note it ends with when
    its key waits out the upstream's Retry-After: kept (cut with the rest, the table
    showed a key in backoff, and not for how long)."""
    head, note, wait = text.rpartition(NEXT_TRY)
    return _clip(head, printable_value) + _clip(note + wait) if note \
        else _clip(text, printable_value)


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _state(u: UpstreamStatus) -> str:
    lost = u.get("unreachable_for_s")
    state = f"unreachable {age(lost)}, probing" if lost is not None else u["state"]
    limit = u.get("frame_limit_bytes")   # it refused a longer one (1009, a 413)
    if limit is not None:
        unit = "frames" if over_websocket(u["protocol"]) else "batches"
        state = f"{state}, {unit} at most {size(limit)}"
    slow = u.get("slow_limit_bytes")   # its link carried no larger batch within timeout_s
    return state if slow is None else f"{state}, batches at most {size(slow)} (slow link)"


def _upstream_rows(data: Snapshot) -> list[list[str]]:
    now = data.get("time")
    rows = []
    for u in data.get("upstreams") or []:
        last_ack = u.get("last_ack")
        rows.append([printable(cell) for cell in (
            printable_value(u["name"]), u["protocol"], _state(u), str(u["queue_depth"]),
            size(u["queue_bytes"]), _dash(u.get("acked")), _dash(u.get("retries")),
            age(now - last_ack) + " ago" if last_ack and now else "-",
            _error(u.get("last_error") or "-"),
        )])
    return rows


def _dead_lines(data: Snapshot) -> list[str]:
    """Dead letters kept, and their newest reasons (`outpost dead list` has the rest)."""
    n = data.get("dead_letters") or 0
    if not n:
        return []
    now = data.get("time") or 0
    error, groups = data.get("dead_reasons_error"), data.get("dead_reasons") or []
    newest = ("newest:" if error is None else
              f"newest as last read (cannot read them now: {error}):" if groups else
              f"their reasons: cannot read them now: {error}")
    lines = [f"dead:     {n} kept (`outpost dead list`, `outpost dead retry`); {newest}"]
    for g in groups:
        # Counted by the agent (dead.aged); an older one's by its wall clock alone.
        waited = g.get("newest_age_s")
        when = (age(waited) + " ago" if waited is not None else
                age(now - g["newest"] / 1000) + " ago" if now else "-")
        lines.append(f"  {g['count']:>6}  {printable_value(g['upstream'])}  {when}  "
                     f"{_clip(g['reason'], printable_value)}")
    return lines


_DEAD_OUT = (Tally.DEAD_RETRIED, Tally.DEAD_PURGED, Tally.DEAD_DROPPED_FULL, Tally.DEAD_EXPIRED)


def render(data: Snapshot) -> str:
    """The snapshot as text: summary lines, the upstream table, then counters."""
    source = data.get("source", "?")
    if data.get("uptime_s") is not None:
        source += f", up {age(data['uptime_s'])}"
    lines = [f"outpost {data.get('version', '?')}: {source}"]
    queue = f"{data.get('queue_depth', 0)} events"
    if data.get("oldest_event_age_s") is not None:
        queue += f", oldest {age(data['oldest_event_age_s'])} old"
    lines.append(f"queue:    {queue}")
    spool = data["spool"]
    used, cap = spool.get("used_bytes"), spool.get("max_bytes")
    room = f"{size(used)} of {size(cap)}, " if used is not None and cap is not None else ""
    lines.append(f"spool:    {room}{spool.get('path', '?')}")
    if spool.get("open_error"):
        lines.append(f"spool:    not open, events refused with 503 until it is (tried again "
                     f"every 5 s): {_clip(str(spool['open_error']))}")
    if spool.get("expiry_errors"):
        lines.append(f"expiry:   {spool['expiry_errors']} runs failed, the last: "
                     f"{_clip(str(spool.get('expiry_last_error')))}")
    reload = data.get("reload")
    if reload is not None and reload["last_error"] is not None:
        lines.append(f"reload:   refused, the running config kept: {_clip(reload['last_error'])}")
    if reload is not None and reload["needs_restart"]:
        lines.append(f"reload:   {', '.join(reload['needs_restart'])} changed in the file; "
                     "a restart applies it")
    sync = data.get("sync")
    if sync is not None:
        lanes = sync.get("held_lanes") or {}
        held = "" if sync["profile"] == "normal" else (
            f", {sync['held_events']} events held"
            + (f" (high {lanes.get('high', 0)}, normal {lanes.get('normal', 0)})" if lanes else ""))
        failed = sync.get("errors") or 0
        errors = (f"; {failed} reading{'s' if failed > 1 else ''} failed, the last: "
                  f"{_clip(str(sync.get('last_error')))}" if failed else "")
        # The reason and detail name what the readings came from (a D-Bus address: an
        # abstract socket's starts with NUL), escaped below as doctor shows them.
        lines.append(f"sync:     {sync['profile']} ({sync['reason']}){held}; "
                     f"metered {sync['metered']} ({sync['metered_detail']}){errors}")
    rows = _upstream_rows(data)
    lines.append("")
    if rows:
        lines += table(["UPSTREAM", "PROTOCOL", "STATE", "QUEUED", "BYTES", "ACKED", "RETRIES",
                        "LAST ACK", "LAST ERROR"], rows, right={3, 4, 5, 6})
    else:
        lines.append("no upstream configured: events are kept until one is")
    unrouted = data.get("unrouted") or {}
    if unrouted.get("keys"):
        lines.append(f"{unrouted['queue_depth']} events of {unrouted['keys']} key(s) match "
                     "no upstream")
    counters = data.get("counters") or {}
    lines.append("")
    lines.append("events:   " + ", ".join(f"{name} {counters.get(name, 0)}" for name in
                                           (Tally.INGESTED, Tally.DUPLICATES, Tally.ACKED)))
    dropped = {k: v for k, v in (data.get("drops") or {}).items() if v}
    lines.append("dropped:  " + (", ".join(f"{k} {v}" for k, v in dropped.items()) or "none"))
    lines += _dead_lines(data)
    # Where dead letters went (dead_lettered counted them once), and keys let go early:
    # shown once they happened, as the drops (dead_dropped_corrupt: with corrupt spools).
    gone = [f"{t} {counters[t]}" for t in _DEAD_OUT if counters.get(t)]
    if gone:
        lines.append("dead out: " + ", ".join(gone))
    if counters.get(Tally.DEDUPE_FORGOTTEN):
        lines.append(f"dedupe:   {Tally.DEDUPE_FORGOTTEN} {counters[Tally.DEDUPE_FORGOTTEN]}")
    ingest = data.get("ingest")
    refused = ingest["refused"] if ingest else {}
    if refused:
        lines.append("refused:  " + ", ".join(f"{api} {status}: {n}" for api, by in refused.items()
                                              for status, n in by.items()) + " (requests)")
    if counters.get(Tally.SPOOL_CORRUPT):
        dead = counters.get(Tally.DEAD_DROPPED_CORRUPT)
        lines.append(f"corrupt spools moved aside: {counters[Tally.SPOOL_CORRUPT]}" +
                     (f" (dead letters lost with them: {dead})" if dead else ""))
    if counters.get(Tally.WAL_DAMAGED):
        lines.append(f"damaged write-ahead logs (commits lost): {counters[Tally.WAL_DAMAGED]}")
    # Each line, not the text: a field's own line break is shown as \n, not obeyed.
    return "\n".join(map(printable, lines))
