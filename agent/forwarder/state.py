"""What status and metrics show for one upstream, shared by its key loops."""

from __future__ import annotations

from dataclasses import dataclass

from agent.clock import CLOCK
from agent.logs import redact
from agent.terminal import os_text

# Starts the note that ends an error whose key waits out the upstream's Retry-After
# (stream.py): the table of `outpost status` keeps it whole when it cuts the rest.
NEXT_TRY = "; next try in "


@dataclass
class UpstreamState:
    """What status and metrics show for one upstream (shared by its key loops)."""

    name: str
    protocol: str
    state: str = "idle"          # idle | backoff | restarting (after a crash)
    # Status shows "unreachable" instead while unreachable_since is set, "backoff" while
    # any of its keys waits out a backoff (``parked``), and "sending" for "idle" while any
    # of its keys' loops sends (``sending``) or waits in line for one (``waiting``): see
    # ``shown``.
    # By the agent's clock (CLOCK.elapsed_s), shown as Unix times (ops/status.py): a wall
    # clock corrected since (from 1970, say) does not make them decades ago.
    last_ack: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    # The settings (url, protocol, key, proxy) reloads changed since last_error: it was
    # the old target's, and status says so (``error_shown``) until the next error.
    reloaded: tuple[str, ...] = ()
    retries: int = 0
    sent: int = 0                # events in batches sent or tried, a resend counting again
    acked: int = 0               # events acked, counted once their delete is saved
    dead_lettered: int = 0
    crashes: int = 0             # unexpected exceptions caught by the supervisor
    unreadable_replies: int = 0  # upstream messages ignored as unreadable (websocket: not JSON)
    # When a probe first failed to connect, by the agent's clock (CLOCK.elapsed_s: status
    # shows time passed, whatever the wall clock did meanwhile); while set, probed every
    # 2 s (probe.py).
    unreachable_since: float | None = None
    probes: int = 0              # TCP probes finished
    # The most bytes per batch it takes, learned from its refusals (a websocket closed
    # with 1009 for a frame, a 413 with a Retry-After: half that batch): loops send it no
    # larger ones (a 413's, until it eases).
    frame_limit_bytes: int | None = None
    # By the forwarder's clock (Timing.now), when a limit from a 413 with a Retry-After (a
    # size refused for now) doubles, if its batches are answered by then (stream.py); inf
    # until the first is answered after the wait. None: no such limit (a 1009's is the
    # upstream's frame cap: it stays).
    frame_limit_eases_at: float | None = None
    # The most bytes per batch its link carried within timeout_s lately: halved from a
    # batch that got no answer in time, doubled back while answers say a batch of twice
    # it would go in time (stream.py). None: no cut.
    slow_limit_bytes: int | None = None
    parked: int = 0              # its keys waiting out a backoff (the supervisor's count)
    # Its keys' loops sending now: with a batch in flight or its acks being committed, or
    # a batch due to go, from a loop just out of its key's backoff, restarted, or handed
    # its key's events by the last (StreamForwarder's _mark_sending, resume, ended).
    # Counted, not set by each loop as it went: one key's batch answered said "idle"
    # while another's was in flight, and between a batch's answer and the next one's
    # request (most of a fast drain).
    sending: int = 0
    # Its keys waiting in line for a loop (max_loops busy): their events due or not, each
    # goes as soon as a loop is free (the supervisor's count), so they are sending too.
    waiting: int = 0

    @property
    def shown(self) -> str:
        """The state status shows: "unreachable" while probed as such, "backoff" while a
        key waits for its retry (however often its other keys are answered meanwhile),
        "sending" while a key's loop sends or a key waits in line for one, else ``state``."""
        if self.unreachable_since is not None:
            return "unreachable"
        if self.state != "idle":
            return self.state
        return "backoff" if self.parked else "sending" if self.sending or self.waiting \
            else "idle"

    @property
    def error_shown(self) -> str | None:
        """``last_error``, said to be from before the reloads that changed the upstream
        since: an operator who mended its url or key must not read the old host's error,
        or a 401's "check the key", as the new one's. Without the old target's next try:
        its keys no longer wait for it (a changed upstream starts afresh)."""
        if self.last_error is None or not self.reloaded:
            return self.last_error
        head, note, _ = self.last_error.rpartition(NEXT_TRY)
        *rest, last = self.reloaded
        changed = f"{', '.join(rest)} and {last}" if rest else last
        return f"before a reload changed its {changed}: {head if note else self.last_error}"

    def unreadable_reply(self) -> None:
        self.unreadable_replies += 1

    def error(self, text: str, after: str = "") -> None:
        # Upstream replies and exceptions can echo a key: status, the page and
        # /metrics show this, so it is redacted (and bounded) here, once. ``after`` (ours)
        # is kept whole: ``text`` is cut to leave it room. A byte of the network's that is
        # not UTF-8 (aiohttp reads header bytes as lone surrogates: a redirect's Location)
        # is shown as ``\xe9``: /status's JSON takes no lone surrogate, and answered 500.
        self.last_error = os_text(redact(text))[:300 - len(after)] + after
        self.last_error_at = CLOCK.elapsed_s()
        self.reloaded = ()
