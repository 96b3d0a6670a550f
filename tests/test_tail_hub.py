"""The live view's hub alone: whatever ingest and upstream acks offer and however viewers
keep up, each viewer is shown or told of every message it wanted, and every drop is
counted once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.families.event import SEGMENT, Event
from agent.metrics import Metrics
from agent.ops.tail import QUEUE, TAKE, TailHub, as_sent, fingerprint
from agent.spool.types import Row

KEYS = ("key-one-0001", "key-two-0002")

BODY = b'{"type":"track","event":"e","userId":"u","messageId":"m"}'
# Steps: ("post", key index, events, % of them new): a request; ("ack", key index, rows
# sent, % of them acked): an upstream's ack; ("take", viewer, 0, 0): a viewer's take.
steps = st.lists(st.one_of(
    st.tuples(st.sampled_from(["post", "ack"]), st.integers(0, 1), st.integers(0, 1500),
              st.integers(0, 100)),
    st.tuples(st.just("take"), st.integers(0, 1), st.just(0), st.just(0))), max_size=30)


@settings(max_examples=60, deadline=None)
@given(steps)
def test_every_wanted_message_is_shown_or_reported_dropped(
        plan: list[tuple[str, int, int, int]]) -> None:
    metrics = Metrics()
    hub = TailHub(metrics)
    every, only_two = hub.watch(None), hub.watch(fingerprint(KEYS[1]))
    assert every is not None and only_two is not None
    viewers = (every, only_two)
    wanted = [0, 0]
    shown = [0, 0]
    missed = [0, 0]

    def take(i: int) -> None:
        out = viewers[i].take()
        assert out is not None and len(out) <= TAKE + 1
        shown[i] += sum(m["kind"] != "dropped" for m in out)
        missed[i] += sum(m["count"] for m in out if m["kind"] == "dropped")

    for step, k, n, pct in plan:
        key = KEYS[k]
        if step == "take":
            take(k)
            continue
        if step == "ack":
            rows = [Row(100 + i, k, SEGMENT, 0, BODY) for i in range(n)]
            acked = [row.seq for row in rows][: n * pct // 100]
            hub.acked("up", key, rows, acked)
            wanted[0] += len(acked)
            wanted[1] += len(acked) if k == 1 else 0
            continue
        events = [Event(key, SEGMENT, i, b'{"type":"track","event":"e","userId":"u"}')
                  for i in range(n)]
        stored = n * pct // 100
        hub.ingested(events, stored)
        # A viewer is told of resends only with the request's events it wants.
        note = 1 if n and stored < n else 0
        wanted[0] += n + note
        if k == 1:
            wanted[1] += n + note
        assert all(len(v.queue) <= QUEUE for v in viewers)
    for i in (0, 1):   # drain: the viewer catches up at last
        while viewers[i].queue or viewers[i].dropped:
            take(i)
    assert [s + m for s, m in zip(shown, missed)] == wanted
    assert metrics.tail_dropped == sum(missed)
    assert metrics.tail_viewers == 2
    hub.close()
    assert every.take() is None and hub.watch(None) is None


def test_a_segment_event_that_only_looks_mapped_is_shown_as_sent() -> None:
    # A Segment app's event with a nucleus- messageId and a context.nucleus (relayed by
    # another agent, say) is no mapping this agent can give back: shown as it is.
    body = {"type": "track", "event": "Clicked", "messageId": "nucleus-abc",
            "anonymousId": "a", "context": {"nucleus": {"sessionId": 3}}}
    assert as_sent(SEGMENT, dict(body), 0) == (SEGMENT, body)
