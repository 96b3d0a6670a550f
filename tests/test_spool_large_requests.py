"""Requests of more events than a slice (a Nucleus module's whole queue in one message):
taken in a slice at a time as they are appended, with the same outcome as a small request.

Real spools on SQLite files. What the slices buy, the event loop free between them while
a 38,000-event message is stored, is measured by `python -m bench.large`, not here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
import pytest

from agent.families.event import NUCLEUS, SEGMENT, Columns, Event, dedupe_key
from agent.families.lanes import HIGH, NORMAL
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.writer import SLICE_EVENTS

MANY = 2 * SLICE_EVENTS + 5   # three slices, the last one short


def ev(key: str, n: int, family: int = NUCLEUS, lane: int = NORMAL) -> Event:
    body = orjson.dumps({"id": n, "name": f"e{n}"})
    return Event(key, family, dedupe_key(key, n), body, n if family == NUCLEUS else None,
                 lane=lane)


def as_columns(events: list[Event]) -> Sequence[Event]:
    """``events`` as a batch's accept loop hands them on (Columns), when of one family."""
    if len({e.family for e in events}) != 1:
        return events
    out = Columns(events[0].family, events[0].key, by_event_keys=True)
    assert out.keys is not None
    for e in events:
        out.keys.append(e.key)
        out.dedupes.append(e.dedupe)
        out.bodies.append(e.body)
        out.lanes.append(e.lane)
        if out.ids is not None:
            out.ids.append(e.ack_id)
    return out


Shaped = Callable[[list[Event]], Sequence[Event]]


@pytest.fixture(params=["events", "columns"])
def shaped(request: pytest.FixtureRequest) -> Shaped:
    """Each test with the request's events as Events, and as a batch's columns."""
    return as_columns if request.param == "columns" else list


async def open_spool(tmp_path: Path) -> Spool:
    return await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))


async def ids_of(spool: Spool, key: str, lane: int | None = None) -> list[int]:
    """The ids of ``key``'s queued events, in the order they go out (FIFO per lane)."""
    rows = await spool.fetch(spool.streams[key].id, 0, 10 * MANY)
    return [orjson.loads(r.body)["id"] for r in rows if lane is None or r.lane == lane]


async def test_a_large_request_is_stored_whole_in_order_and_once(
        tmp_path: Path, shaped: Shaped) -> None:
    spool = await open_spool(tmp_path)
    events = [ev("k", i) for i in range(MANY)]
    assert await spool.append(shaped(events)) == MANY
    assert await ids_of(spool, "k") == list(range(MANY))
    # The module resends its queue (the ack was lost): every event a duplicate.
    assert await spool.append(shaped(events)) == 0
    assert spool.counters["duplicates"] == MANY
    await spool.close()
    again = await open_spool(tmp_path)   # the keys were stored with the records
    assert await again.append(shaped(events[-3:])) == 0 and again.depth == MANY
    await again.close()


async def test_a_large_request_partly_stored_before_stores_the_rest(
        tmp_path: Path, shaped: Shaped) -> None:
    spool = await open_spool(tmp_path)
    thirds = len(range(0, MANY, 3))
    assert await spool.append(shaped([ev("k", i) for i in range(0, MANY, 3)])) == thirds
    assert await spool.append(shaped([ev("k", i) for i in range(MANY)])) == MANY - thirds
    stored = await ids_of(spool, "k")
    assert sorted(stored) == list(range(MANY)) and len(set(stored)) == MANY
    assert stored[thirds:] == [i for i in range(MANY) if i % 3]
    await spool.close()


async def test_a_large_request_repeating_an_event_stores_it_once(
        tmp_path: Path, shaped: Shaped) -> None:
    spool = await open_spool(tmp_path)
    events = [ev("k", i) for i in range(MANY)]
    events.insert(SLICE_EVENTS + 7, ev("k", 3))   # in another slice than the first
    assert await spool.append(shaped(events)) == MANY
    assert await ids_of(spool, "k") == list(range(MANY))
    await spool.close()


async def test_a_large_request_of_mixed_keys_families_and_lanes(
        tmp_path: Path, shaped: Shaped) -> None:
    spool = await open_spool(tmp_path)
    events = [ev("a" if i % 2 else "b", i) for i in range(MANY)]
    events[-1] = ev("b", MANY, family=SEGMENT)   # a change of family in the last slice
    events[SLICE_EVENTS] = ev("a", -1, lane=HIGH)
    assert await spool.append(shaped(events)) == MANY
    assert await ids_of(spool, "a", HIGH) == [-1]
    assert await ids_of(spool, "a", NORMAL) == [i for i in range(1, MANY - 1, 2)
                                                if i != SLICE_EVENTS]
    assert await ids_of(spool, "b") == [i for i in range(0, MANY - 1, 2)
                                        if i != SLICE_EVENTS] + [MANY]
    await spool.close()


async def test_a_large_and_a_small_request_sharing_an_event_store_it_once(
        tmp_path: Path, shaped: Shaped) -> None:
    spool = await open_spool(tmp_path)
    large = [ev("k", i) for i in range(MANY)]
    small = [ev("k", MANY - 1), ev("k", MANY + 1)]   # sent meanwhile by another connection
    got = await asyncio.gather(spool.append(shaped(large)), spool.append(shaped(small)))
    assert sum(got) == MANY + 1
    stored = await ids_of(spool, "k")
    assert sorted(stored) == [*range(MANY), MANY + 1]
    await spool.close()



@pytest.mark.parametrize("odd", ["key", "family", "lane"])
async def test_one_event_unlike_the_rest_in_a_later_slice_keeps_its_place(
        tmp_path: Path, shaped: Shaped, odd: str) -> None:
    """One key, family and lane but for one event in the second slice: an app's `init`
    (high lane) among its clicks, an event of another family, or of another key."""
    spool = await open_spool(tmp_path)
    events = [ev("k", i) for i in range(MANY)]
    at = SLICE_EVENTS + 1
    events[at] = (ev("other", -1) if odd == "key" else ev("k", -1, lane=HIGH) if odd == "lane"
                  else ev("k", -1, family=SEGMENT))
    assert await spool.append(shaped(events)) == MANY
    rest = [i for i in range(MANY) if i != at]
    if odd == "key":
        assert await ids_of(spool, "other") == [-1]
        assert await ids_of(spool, "k") == rest
    elif odd == "lane":
        assert await ids_of(spool, "k", HIGH) == [-1]
        assert await ids_of(spool, "k", NORMAL) == rest
    else:   # a record per family, in order: the queue as it came
        assert await ids_of(spool, "k") == list(range(at)) + [-1] + list(range(at + 1, MANY))
        rows = await spool.fetch(spool.streams["k"].id, 0, 10 * MANY)
        assert [r.family for r in rows].index(SEGMENT) == at
    await spool.close()
