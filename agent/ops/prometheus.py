"""GET /metrics: the status snapshot in the Prometheus text exposition format 0.0.4.

Written by hand: the format is a few line shapes, and prometheus_client would
bring a global registry and its own counter objects that would duplicate
the spool's durable counters rather than read them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from agent.metrics import Histogram
from agent.ops.status import Connections, Ingest, Snapshot, SyncStatus, UpstreamStatus
from agent.outcomes import Drop, Tally

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# UpstreamState.state's values: each upstream exports all of them, 1 for the
# current one, so that a state that is not current reads 0 instead of vanishing.
UPSTREAM_STATES = ("idle", "sending", "backoff", "restarting", "unreachable")

Labels = dict[str, str]
Sample = tuple[str, Labels, float]  # (name suffix, labels, value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(value)


class Exposition:
    """Accumulates metric families; ``text()`` is the response body."""

    def __init__(self, prefix: str = "outpost_") -> None:
        self.prefix = prefix
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        full = self.prefix + name
        help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
        for suffix, labels, value in samples:
            text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{full}{suffix}{{{text}}} {_number(value)}" if text
                              else f"{full}{suffix} {_number(value)}")

    def gauge(self, name: str, help_text: str, value: float, **labels: str) -> None:
        self.family(name, "gauge", help_text, [("", labels, value)])

    def counter(self, name: str, help_text: str, value: float) -> None:
        self.family(name, "counter", help_text, [("", {}, value)])

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        samples: list[Sample] = []
        cumulative = 0
        # Histogram.counts holds one count per bound plus the overflow; the
        # exposition wants running totals, ending with le="+Inf" == _count.
        for bound, count in zip((*hist.bounds, math.inf), hist.counts):
            cumulative += count
            samples.append(("_bucket", {"le": _number(bound)}, cumulative))
        samples += [("_sum", {}, hist.total), ("_count", {}, hist.n)]
        self.family(name, "histogram", help_text, samples)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(snap: Snapshot, latency: Histogram) -> str:
    """The exposition for one status snapshot plus the ingest latency histogram."""
    out = Exposition()
    out.gauge("build_info", "Outpost version, as a label; always 1.", 1, version=snap["version"])
    # Rendered from a running agent's snapshot: the fields only it knows are not null.
    out.gauge("uptime_seconds", "Seconds since the agent started.", snap["uptime_s"] or 0)
    out.gauge("queue_events", "Events in the spool waiting for an upstream acknowledgement.",
              snap["queue_depth"])
    out.gauge("oldest_event_age_seconds",
              "Age of the oldest queued event, by its receive time; 0 when the queue is empty.",
              snap["oldest_event_age_s"] or 0)
    out.gauge("spool_bytes", "Bytes the spool file uses.", snap["spool"]["used_bytes"] or 0)
    out.gauge("spool_max_bytes", "storage.max_size_mb, in bytes.", snap["spool"]["max_bytes"] or 0)
    # Else only /status says it: with no app sending, nothing here moved meanwhile.
    out.gauge("spool_open", "1 while the spool is open; 0 while it cannot be opened (a full "
              "disk, say): events are refused with 503 and none forwarded; /status says why "
              "(spool.open_error).", 0 if snap["spool"]["open_error"] else 1)
    out.counter("expiry_errors_total", "Expiry runs (max_age_days, the dedupe window) that "
                "failed; the last error is in /status.", snap["spool"]["expiry_errors"] or 0)
    out.gauge("unrouted_queue_events",
              "Queued events whose key no upstream takes (kept until one is configured).",
              snap["unrouted"]["queue_depth"])
    out.gauge("dead_letters", "Dead letters kept in the spool now (`outpost dead list`).",
              snap["dead_letters"])
    counters = snap["counters"]
    for tally in Tally:
        out.counter(tally.metric, tally.help, counters[tally])
    out.family("events_dropped_total", "counter",
               "Events lost or refused, by reason: "
               + "; ".join(f"{reason} ({reason.help})" for reason in Drop) + ".",
               [("", {"reason": reason}, n) for reason, n in snap["drops"].items()])
    _upstreams(out, snap["upstreams"])
    if snap["connections"] is not None:
        _connections(out, snap["connections"])
    if snap["ingest"] is not None:
        _ingest(out, snap["ingest"])
    if snap["sync"] is not None:
        _sync(out, snap["sync"])
    if snap["reload"] is not None:
        reload = snap["reload"]
        out.family("config_reloads_total", "counter",
                   "Reloads (SIGHUP) since the agent started: applied, or refused (the running "
                   "config kept; the last refusal is in /status).",
                   [("", {"result": "applied"}, reload["applied"]),
                    ("", {"result": "refused"}, reload["refused"])])
        out.gauge("config_restart_needed", "1 when a reload read changes that only a restart "
                  "applies (named in /status), else 0.", 1 if reload["needs_restart"] else 0)
    out.histogram("ingest_latency_seconds",
                  "Time to commit one ingest request's events (the group commit and fsync).",
                  latency)
    return out.text()


def _sync(out: Exposition, sync: SyncStatus) -> None:
    out.family("sync_profile", "gauge",
               "1 for the transmit profile in force (normal, priority_only, hold), else 0; "
               "the reason as a label.",
               [("", {"profile": p, "reason": sync["reason"] if p == sync["profile"] else ""},
                 1 if p == sync["profile"] else 0) for p in ("normal", "priority_only", "hold")])
    out.family("sync_held_events", "gauge",
               "Queued events the transmit profile holds back now, by priority lane.",
               [("", {"lane": lane}, n) for lane, n in sync["held_lanes"].items()])
    out.counter("sync_max_hold_releases_total",
                "Times sync.max_hold_h sent everything held, since the agent started.",
                sync["releases"])
    out.counter("sync_errors_total",
                "Times a transmit-profile watcher failed (logged, and started again).",
                sync["errors"])
    # No label: the reading's detail is free text (an error's too), a new series at each
    # change; /status shows it.
    out.gauge("sync_metered", "1 on a metered network, 0 on an unmetered or unknown one.",
              1 if sync["metered"] == "yes" else 0)


def _connections(out: Exposition, conns: Connections) -> None:
    out.gauge("connections_open", "Client connections open now.", conns["open"])
    out.gauge("connections_max", "Client connections allowed at once (listen.max_connections, "
              "lowered to fit the open-file limit).", conns["max"])
    out.family("connections_closed_total", "counter",
               "Client connections the agent closed, by reason (idle, slow_head, large_head, "
               "evicted, refused).", [("", {"reason": r}, n) for r, n in conns["closed"].items()])
    out.counter("http_express_requests_total",
                "Plain requests to Segment's single-call and batch routes answered by the "
                "express lane rather than the full HTTP stack (the same reply either way).",
                conns["express"])


def _ingest(out: Exposition, ingest: Ingest) -> None:
    out.gauge("ingest_inflight_bytes",
              "Bytes of request bodies being read, parsed or committed right now.",
              ingest["inflight_bytes"])
    out.gauge("ingest_inflight_budget_bytes", "listen.max_inflight_mb, in bytes.",
              ingest["inflight_budget"])
    out.counter("ingest_busy_total",
                "Requests answered busy (503/429 + Retry-After): the in-flight budget was full.",
                ingest["busy_refusals"])
    out.counter("memory_trims_total", "Times freed heap memory was handed back to the OS "
                "after a burst of ingest.", ingest["memory_trims"])
    out.gauge("tail_viewers", "Live event views open (`outpost tail`, the status page's panel).",
              ingest["tail_viewers"])
    out.counter("tail_dropped_total", "Live event view messages dropped because a viewer "
                "fell behind (ingest never waits for a viewer).", ingest["tail_dropped"])
    out.family("tail_closed_total", "counter",
               "Live event views the agent closed, by reason (replaced: a newer view took "
               "its place; stalled: its stream waited too long for it to read).",
               [("", {"reason": r}, n) for r, n in ingest["tail_closed"].items()])
    out.family("ingest_refused_total", "counter",
               "Ingest requests refused, by API and HTTP status (a websocket's by its close "
               "code; the pixel, always answered 200, by the status its problem has elsewhere).",
               [("", {"api": api, "status": status}, n)
                for api, by_status in ingest["refused"].items() for status, n in by_status.items()])


def _upstreams(out: Exposition, ups: list[UpstreamStatus]) -> None:
    def per(values: Iterable[float | None]) -> list[Sample]:
        return [("", {"upstream": u["name"]}, v or 0) for u, v in zip(ups, values)]

    out.family("upstream_queue_events", "gauge", "Events queued for each upstream.",
               per(u["queue_depth"] for u in ups))
    out.family("upstream_queue_bytes", "gauge", "Bytes of events queued for each upstream.",
               per(u["queue_bytes"] for u in ups))
    out.family("upstream_acked_total", "counter",
               "Events each upstream acknowledged since the agent started.",
               per(u["acked"] for u in ups))
    out.family("upstream_dead_lettered_total", "counter",
               "Events each upstream refused for good, moved to dead letters, since the agent "
               "started.", per(u["dead_lettered"] for u in ups))
    out.family("upstream_sent_total", "counter",
               "Events in the batches sent, or tried, to each upstream since the agent "
               "started; a resend counts again (beside acked: what resends cost).",
               per(u["sent"] for u in ups))
    out.family("upstream_retries_total", "counter",
               "Backoffs after a failed send to each upstream since the agent started.",
               per(u["retries"] for u in ups))
    out.family("upstream_crashes_total", "counter",
               "Unexpected errors in each upstream's forwarders (each one logged with its "
               "traceback; the forwarder restarts) since the agent started.",
               per(u["crashes"] for u in ups))
    out.family("upstream_unreadable_replies_total", "counter",
               "Messages from each upstream that were not a reply the agent could read "
               "(websocket text that is not JSON), ignored, since the agent started.",
               per(u["unreadable_replies"] for u in ups))
    out.family("upstream_state", "gauge",
               "1 for each upstream's current state (idle, sending, backoff, restarting, "
               "unreachable: probed every few seconds), "
               "else 0.",
               [("", {"upstream": u["name"], "state": s}, 1 if u["state"] == s else 0)
                for u in ups for s in _states(u["state"])])
    out.family("upstream_unreachable_seconds", "gauge",
               "Seconds since each upstream was found unreachable (a TCP connect failed); "
               "0 while reachable.", per(u["unreachable_for_s"] for u in ups))
    out.family("upstream_probes_total", "counter",
               "TCP connects that probed each upstream's reachability since the agent started.",
               per(u["probes"] for u in ups))
    out.family("upstream_last_ack_timestamp_seconds", "gauge",
               "Unix time of each upstream's last acknowledgement (absent before the first).",
               [("", {"upstream": u["name"]}, u["last_ack"]) for u in ups
                if u["last_ack"] is not None])


def _states(current: str) -> tuple[str, ...]:
    # A state added to the forwarder later still shows, as an extra series.
    return UPSTREAM_STATES if current in UPSTREAM_STATES else (*UPSTREAM_STATES, current)
