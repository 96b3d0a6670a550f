"""Make tests/data/spool-v0.db with the pre-issue-11 code (schema v0), for tests/test_migrate.py.

Run on a checkout of 4a6f75f (the last commit with the v0 spool):
``python tests/data/make_v0.py tests/data/spool-v0.db``. 60 events over a Nucleus key and
a Segment key, 5 resends (counted duplicates), 20 acked (tombstones), 2 dead letters.
"""
import asyncio
import sqlite3
import sys
from pathlib import Path

import orjson

from agent.families.event import NUCLEUS, SEGMENT, Event, dedupe_key
from agent.settings import StorageConfig
from agent.spool import Spool


async def main(path: Path) -> None:
    spool = await Spool.open(StorageConfig(path=str(path)))
    evs = []
    for i in range(30):
        body = {"type": "event", "name": f"n{i}", "id": i, "date": "2026-11-01T00:00:00.000Z",
                "machineId": "m1", "payload": {"i": i, "s": "é✓"}}
        evs.append(Event("app-nucleus", NUCLEUS, dedupe_key("nucleus", "app-nucleus", i),
                         orjson.dumps(body)))
    for i in range(30):
        body = {"type": "track", "event": f"e{i}", "messageId": f"m-{i}", "anonymousId": "a1",
                "properties": {"i": i}, "receivedAt": "2026-11-01T00:00:00.000Z",
                "timestamp": "2026-11-01T00:00:00.000Z"}
        evs.append(Event("seg-key", SEGMENT, dedupe_key("segment", "seg-key", f"m-{i}"),
                         orjson.dumps(body)))
    assert await spool.append(evs) == 60
    assert await spool.append(evs[:5]) == 0   # duplicates counted
    rows_n = await spool.fetch(spool.streams["app-nucleus"].id, 0, 100)
    rows_s = await spool.fetch(spool.streams["seg-key"].id, 0, 100)
    await spool.ack([r.seq for r in rows_n[:10]] + [r.seq for r in rows_s[:10]])   # tombstones
    await spool.dead_letter([(rows_n[10].seq, "up", "HTTP 400: bad"),
                             (rows_s[10].seq, "up", "HTTP 413: big")])
    await spool.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("VACUUM")
    conn.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
