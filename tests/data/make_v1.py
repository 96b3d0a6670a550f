"""Make tests/data/spool-v1.db with the code from before priority lanes (schema v1), for
tests/test_migrate_lanes.py.

Run on a checkout of ca0bdb3 (the last commit with the v1 spool):
``python tests/data/make_v1.py tests/data/spool-v1.db``. Two keys:

- ``app-nucleus``: three commits of Nucleus events: [init s1, event x3], [event x3],
  [error s1, event x2]; the init acked (a ``gone`` bit: its record has no high event
  left), one event of the second dead-lettered; resends of the first commit (duplicates).
- ``seg-key``: [track "Application Opened", track x2], [track x3 acked whole: its keys in
  ``spent``], [track "Application Error"] dead-lettered, [identify].
"""
import asyncio
import sqlite3
import sys
from pathlib import Path

import orjson

from agent.families.event import NUCLEUS, SEGMENT, Event, dedupe_key
from agent.settings import StorageConfig
from agent.spool import Spool


def nucleus(i: int, kind: str) -> Event:
    body = {"type": kind, "name": f"n{i}", "id": i, "date": "2026-11-01T00:00:00.000Z",
            "sessionId": "s1", "machineId": "m1", "payload": {"i": i}}
    return Event("app-nucleus", NUCLEUS, dedupe_key("nucleus", "app-nucleus", i),
                 orjson.dumps(body))


def segment(i: int, kind: str, name: str | None = None) -> Event:
    body = {"type": kind, "messageId": f"m-{i}", "anonymousId": "a1", "properties": {"i": i},
            "receivedAt": "2026-11-01T00:00:00.000Z", "timestamp": "2026-11-01T00:00:00.000Z"}
    if name is not None:
        body["event"] = name
    return Event("seg-key", SEGMENT, dedupe_key("segment", "seg-key", f"m-{i}"),
                 orjson.dumps(body))


async def main(path: Path) -> None:
    spool = await Spool.open(StorageConfig(path=str(path)))
    first = [nucleus(0, "init")] + [nucleus(i, "event") for i in (1, 2, 3)]
    assert await spool.append(first) == 4
    assert await spool.append([nucleus(i, "event") for i in (4, 5, 6)]) == 3
    assert await spool.append([nucleus(7, "error")] + [nucleus(i, "event") for i in (8, 9)]) == 3
    assert await spool.append(first) == 0   # duplicates counted
    assert await spool.append([segment(0, "track", "Application Opened"),
                               segment(1, "track", "t1"), segment(2, "track", "t2")]) == 3
    assert await spool.append([segment(i, "track", f"t{i}") for i in (3, 4, 5)]) == 3
    assert await spool.append([segment(6, "track", "Application Error")]) == 1
    assert await spool.append([segment(7, "identify")]) == 1
    rows_n = await spool.fetch(spool.streams["app-nucleus"].id, 0, 100)
    rows_s = await spool.fetch(spool.streams["seg-key"].id, 0, 100)
    await spool.ack([rows_n[0].seq] + [r.seq for r in rows_s[3:6]])
    await spool.dead_letter([(rows_n[5].seq, "up", "HTTP 400: bad"),
                             (rows_s[6].seq, "up", "HTTP 413: big")])
    await spool.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("VACUUM")
    conn.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
