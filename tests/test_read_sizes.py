"""A fetch with ``max_bytes`` gives each run the bytes of its bodies (types.Run.nbytes),
which the splice sizes a batch by: it must be their sum, whatever cut the run (a cursor
inside a record, acked events, the limit, the bytes). A real spool in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.families.event import SEGMENT, Event, dedupe_key
from agent.settings import StorageConfig
from agent.spool import Spool


def ev(n: int) -> Event:
    body = b'{"type":"track","messageId":"m-%d","p":"%b"}' % (n, b"x" * (n * 7 % 50))
    return Event("k", SEGMENT, dedupe_key("k", n), body)


@pytest.mark.parametrize("max_bytes", [None, 1, 700, 3000, 10**6])
async def test_each_run_read_carries_its_bodies_bytes(tmp_path: Path,
                                                      max_bytes: int | None) -> None:
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    try:
        for start in (0, 40, 80):   # a record a request
            await spool.append([ev(n) for n in range(start, start + 40)])
        sid = spool.streams["k"].id
        first = (await spool.fetch(sid, 0, 1))[0].seq
        await spool.ack([first + 10, first + 11, first + 50])   # runs end at acked events
        for after in (0, first + 5, first + 45):
            for limit in (7, 33, 200):
                rows = await spool.fetch(sid, after, limit, max_bytes=max_bytes)
                for run in rows.runs:
                    if max_bytes is None:
                        assert run.nbytes is None
                    else:
                        assert run.nbytes == sum(map(len, run.bodies)), (after, limit, run)
    finally:
        await spool.close()
