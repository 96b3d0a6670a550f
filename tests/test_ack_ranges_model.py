"""Acks as ranges (a spliced batch's seqs), lists and dead letters landing in one commit,
against a model of the queue: ranges that cross records, start or stop inside one, cover
seqs no longer queued or another ack's; the counts, and every delivered event's dedupe
key after a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.families.event import NUCLEUS, SEGMENT, Event, dedupe_key
from agent.outcomes import Drop, Tally
from agent.settings import StorageConfig
from agent.spool import Spool

KEYS = ("a", "b")

# ("append", key index, first id, count, family); ("settle", ops), each op ("range", start
# position, length), ("list", positions) or ("dead", positions), by position among the
# queued events; ("restart",).
_op = st.one_of(
    st.tuples(st.just("range"), st.integers(0, 120), st.integers(0, 60)),
    st.tuples(st.just("list"), st.lists(st.integers(0, 120), max_size=8)),
    st.tuples(st.just("dead"), st.lists(st.integers(0, 120), max_size=3)))
_steps = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(0, 1), st.integers(0, 60), st.integers(1, 40),
              st.sampled_from([NUCLEUS, SEGMENT])),
    st.tuples(st.just("settle"), st.lists(_op, min_size=1, max_size=5)),
    st.tuples(st.just("restart"))), min_size=1, max_size=10)


def event(key: str, i: int, family: int) -> Event:
    return Event(key, family, dedupe_key(key, i), b'{"id":%d}' % i)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_steps)
def test_ranges_lists_and_dead_letters_in_one_commit_match_a_model(
        tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[Any, ...]]) -> None:
    where = str(tmp_path_factory.mktemp("ranges") / "spool.db")
    queued: dict[str, list[int]] = {k: [] for k in KEYS}
    seen: set[tuple[str, int]] = set()
    delivered: set[tuple[str, int]] = set()
    counts = {"acked": 0, "dead": 0}

    async def settle(spool: Spool, ops: list[tuple[Any, ...]]) -> None:
        rows = [r for k in KEYS if k in spool.streams
                for r in await spool.fetch(spool.streams[k].id, 0, 10_000)]
        by_seq = {r.seq: r for r in rows}
        order = sorted(by_seq)
        key_of = {s.id: k for k, s in spool.streams.items()}
        calls: list[Awaitable[None]] = []
        acked: set[int] = set()
        dead: set[int] = set()
        for op in ops:
            if op[0] == "range" and order:
                first = order[min(op[1], len(order) - 1)]
                span = range(first, first + op[2])   # may run past records, into gaps
                acked.update(s for s in span if s in by_seq)
                calls.append(spool.ack(span))
            elif op[0] == "list":
                listed = [order[p] for p in op[1] if p < len(order)]
                acked.update(listed)
                calls.append(spool.ack(listed))
        for op in ops:   # dead letters of events no ack here names (an ack would win)
            if op[0] == "dead":
                picked = {order[p] for p in op[1] if p < len(order)} - acked - dead
                dead.update(picked)
                calls.append(spool.dead_letter([(s, "up", "bad") for s in sorted(picked)]))
        await asyncio.gather(*calls)
        for s in acked | dead:
            r = by_seq[s]
            k, i = key_of[r.stream], orjson.loads(r.body)["id"]
            queued[k].remove(i)
            if s in acked:
                delivered.add((k, i))
        counts["acked"] += len(acked)
        counts["dead"] += len(dead)

    async def run() -> None:
        spool = await Spool.open(StorageConfig(path=where))
        try:
            for step in steps:
                if step[0] == "restart":
                    await spool.close()
                    spool = await Spool.open(StorageConfig(path=where))
                elif step[0] == "append":
                    _, k, first, count, family = step
                    key = KEYS[k]
                    new = [i for i in range(first, first + count) if (key, i) not in seen]
                    assert await spool.append(
                        [event(key, i, family) for i in range(first, first + count)]) == len(new)
                    seen.update((key, i) for i in new)
                    queued[key] += new
                else:
                    await settle(spool, step[1])
                for k in KEYS:
                    stream = spool.streams.get(k)
                    got = await spool.fetch(stream.id, 0, 10_000) if stream else []
                    assert [orjson.loads(r.body)["id"] for r in got] == queued[k]
                    assert (stream.depth if stream else 0) == len(queued[k])
                assert spool.depth == sum(map(len, queued.values()))
                assert spool.counters.get(Tally.ACKED, 0) == counts["acked"]
                assert spool.counters.get(Drop.DEAD_LETTERED, 0) == counts["dead"]
            await spool.close()
            spool = await Spool.open(StorageConfig(path=where))
            # Delivered or still queued: a resend of each is a duplicate, across a restart.
            again = sorted(delivered | {(k, i) for k in KEYS for i in queued[k]})
            for k, i in again:
                assert await spool.append([event(k, i, SEGMENT)]) == 0, (k, i)
        finally:
            await spool.close()

    asyncio.run(run())
