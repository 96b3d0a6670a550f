"""Make tests/data/spool-v3.db with the code from before the built-in dictionary (schema v3),
and spool-v4.db with the code from before learned ones (v4), for
tests/test_migrate_dictionaries.py.

Run on a checkout of f6cd264 (the last commit with the v3 spool):
``python tests/data/make_v3.py tests/data/spool-v3.db``; on one of d561978 (the last with
v4): ``python tests/data/make_v3.py tests/data/spool-v4.db``. Two keys: ``app-1`` (Nucleus, 12
events: 4 acked, 2 dead-lettered, 6 queued in three commits, one in the high lane) and
``wk-1`` (Segment, 5 events queued in two commits). Every record is small: the size at
which v4 packs with the built-in dictionary, so the test sees each version's own codec
tags read back.
"""
import asyncio
import sqlite3
import sys
from pathlib import Path

import orjson

from agent.families.event import NUCLEUS, SEGMENT, Event, dedupe_key
from agent.families.lanes import HIGH, NORMAL
from agent.settings import StorageConfig
from agent.spool import Spool


def nucleus(i: int) -> Event:
    body = {"type": "error" if i == 11 else "event", "name": f"n{i}", "id": i,
            "date": "2026-11-01T00:00:00.000Z", "sessionId": "s1", "machineId": "m1"}
    return Event("app-1", NUCLEUS, dedupe_key("nucleus", "app-1", i), orjson.dumps(body), i,
                 HIGH if i == 11 else NORMAL)


def segment(i: int) -> Event:
    body = {"type": "track", "event": f"e{i}", "userId": "u1", "messageId": f"m-{i}",
            "timestamp": "2026-11-01T00:00:00.000Z"}
    return Event("wk-1", SEGMENT, dedupe_key("segment", "wk-1", f"m-{i}"), orjson.dumps(body),
                 None, NORMAL)


async def main(path: Path) -> None:
    spool = await Spool.open(StorageConfig(path=str(path)))
    for start in (0, 4, 8):
        assert await spool.append([nucleus(i) for i in range(start, start + 4)]) == 4
    assert await spool.append([segment(i) for i in range(3)]) == 3
    assert await spool.append([segment(i) for i in range(3, 5)]) == 2
    rows = await spool.fetch(spool.streams["app-1"].id, 0, 100)
    await spool.ack([r.seq for r in rows if r.seq <= 4])
    await spool.dead_letter([(r.seq, "up", "HTTP 400: bad") for r in rows if r.seq in (5, 6)])
    await spool.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("VACUUM")
    conn.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
