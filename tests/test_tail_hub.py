"""The live view's hub alone: whatever ingest and upstream acks offer and however viewers
keep up, each viewer is shown or told of every message it wanted, and every drop is
counted once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.families.event import NUCLEUS, SEGMENT, Event
from agent.logs import fingerprint
from agent.metrics import Metrics
from agent.ops.tail import MAX_VIEWERS, QUEUE, QUEUE_BYTES, TAKE, TailHub, as_sent
from agent.spool.types import Row

KEYS = ("key-one-0001", "key-two-0002")

BODY = b'{"type":"track","event":"e","userId":"u","messageId":"m"}'
# Steps: ("post", key index, events, % of them new): a request; ("ack", key index, rows
# sent, % of them acked): an upstream's ack; ("take", viewer, 0, 0): a viewer's take.
steps = st.lists(st.one_of(
    st.tuples(st.sampled_from(["post", "ack"]), st.integers(0, 1), st.integers(0, 1500),
              st.integers(0, 100)),
    st.tuples(st.just("take"), st.integers(0, 1), st.just(0), st.just(0))), max_size=30)


def shown_once_saved(hub: TailHub, key: str, rows: list[Row], acked: list[int]) -> None:
    """An upstream's ack of ``acked``, recorded by the spool: the forwarder shows it."""
    show = hub.acked("up", key, rows, acked)
    if show is not None:
        show()


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
        # Bodies of up to 20 KB: a few steps fill a viewer's QUEUE_BYTES before its QUEUE.
        body = BODY[:-1] + b',"pad":"' + b"x" * (pct * 200) + b'"}'
        if step == "ack":
            rows = [Row(100 + i, k, SEGMENT, 0, body) for i in range(n)]
            acked = [row.seq for row in rows][: n * pct // 100]
            shown_once_saved(hub, key, rows, acked)
            wanted[0] += len(acked)
            wanted[1] += len(acked) if k == 1 else 0
            continue
        events = [Event(key, SEGMENT, i, body) for i in range(n)]
        stored = n * pct // 100
        hub.ingested(events, stored)
        # A viewer is told of resends only with the request's events it wants.
        note = 1 if n and stored < n else 0
        wanted[0] += n + note
        if k == 1:
            wanted[1] += n + note
        assert all(len(v.queue) <= QUEUE and v.held <= QUEUE_BYTES for v in viewers)
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


def test_a_viewer_that_falls_behind_holds_a_bounded_size_of_events() -> None:
    """A viewer's queue was bounded by count alone: 1,000 events of up to 500 KB (a Nucleus
    event as large as its upstream's batch) is 500 MB held for one stalled `outpost tail`,
    which any local process can open. Past QUEUE_BYTES of bodies, the overflow is dropped
    and counted like any other."""
    metrics = Metrics()
    hub = TailHub(metrics)
    viewer = hub.watch(None)
    assert viewer is not None
    big = b'{"type":"event","name":"n","id":1,"blob":"' + b"x" * 300_000 + b'"}'
    for i in range(40):
        hub.ingested([Event("k", NUCLEUS, i, big)], 1)
        shown_once_saved(hub, "k", [Row(i, 1, NUCLEUS, 0, big)], [i])
    hub.ingested([Event("k", NUCLEUS, i, big) for i in range(40)], 40)
    held = sum(len(item.body) if isinstance(item, Event) else len(item[1][2].body)
               for item in viewer.queue)
    assert 0 < held == viewer.held <= QUEUE_BYTES
    assert metrics.tail_dropped == viewer.dropped == 120 - len(viewer.queue)
    # As the viewer catches up, room comes back.
    shown = 0
    while viewer.queue:
        out = viewer.take()
        assert out is not None
        shown += sum(m["kind"] != "dropped" for m in out)
    assert viewer.held == 0
    hub.ingested([Event("k", NUCLEUS, 0, big)], 1)
    assert len(viewer.queue) == 1 and shown + metrics.tail_dropped == 120


def test_a_new_viewer_takes_the_place_of_the_longest_stalled_else_of_the_oldest() -> None:
    metrics = Metrics()
    hub = TailHub(metrics)
    first, second, third, fourth = (hub.watch(None) for _ in range(MAX_VIEWERS))
    assert first and second and third and fourth
    second.writing_since, third.writing_since = 500, 100   # both wait for their reader
    fourth.writing_since = None
    order = []
    for _ in range(3):
        new = hub.watch(None)
        assert new is not None and len(hub.viewers) == MAX_VIEWERS
        [gone] = [v for v in (first, second, third, fourth) if v.ended and v not in order]
        order.append(gone)
    assert order == [third, second, first]
    assert all(v.ended == "replaced" and v.take() is None for v in order)
    assert metrics.tail_closed == {"replaced": 3, "stalled": 0}
    assert metrics.tail_viewers == MAX_VIEWERS and fourth in hub.viewers
    hub.close()   # stopping ends every view, and is no drop
    assert fourth.ended == "stopping" and metrics.tail_closed["replaced"] == 3
