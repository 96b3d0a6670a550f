"""Make tests/data/spool-v2.db with the code from before the kept dead-letter summary
(schema v2), for tests/test_migrate_dead.py.

Run on a checkout of fead784 (the last commit with the v2 spool):
``python tests/data/make_v2.py tests/data/spool-v2.db``. One Nucleus key, ``app-1``,
with 40 events: 10 acked, 20 dead-lettered in five commits an hour apart (by the
agent's clock, shifted) under two upstreams and three reasons, 10 still queued (two in
the high lane).
"""
import asyncio
import sqlite3
import sys
from pathlib import Path

import orjson

from agent.clock import CLOCK
from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.families.lanes import HIGH, NORMAL
from agent.settings import StorageConfig
from agent.spool import Spool

HOUR_MS = 3_600_000
START_MS = 1_790_000_000_000   # 2026-09-21: the letters' times do not depend on the day run
REASONS = ("HTTP 400: bad", "HTTP 413: big", "HTTP 422: odd")


def nucleus(i: int) -> Event:
    body = {"type": "error" if i >= 38 else "event", "name": f"n{i}", "id": i,
            "date": "2026-11-01T00:00:00.000Z", "sessionId": "s1", "machineId": "m1"}
    return Event("app-1", NUCLEUS, dedupe_key("nucleus", "app-1", i), orjson.dumps(body), i,
                 HIGH if i >= 38 else NORMAL)


async def main(path: Path) -> None:
    CLOCK.wall_shift_ms = START_MS - CLOCK.wall_ms()
    spool = await Spool.open(StorageConfig(path=str(path)))
    assert await spool.append([nucleus(i) for i in range(40)]) == 40
    rows = await spool.fetch(spool.streams["app-1"].id, 0, 100)
    await spool.ack([r.seq for r in rows if r.seq <= 10])
    for commit in range(5):   # 4 letters per commit, an hour apart
        CLOCK.wall_shift_ms += HOUR_MS
        letters = [r for r in rows if 10 < r.seq <= 30][commit * 4:commit * 4 + 4]
        await spool.dead_letter([(r.seq, "up" if r.seq % 2 else "other",
                                  REASONS[(r.seq + commit) % 3]) for r in letters])
    await spool.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("VACUUM")
    conn.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
