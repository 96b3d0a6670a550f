"""Make tests/data/spool-v5.db with the code from before the dead letters' summary kept their
agent-observed times (schema v5), for tests/test_migrate_dead_seen.py.

Run on a checkout of eb9513b7 (the last commit with the v5 spool):
``python tests/data/make_v5.py tests/data/spool-v5.db``. One Nucleus key ``app-1`` with 14
events: 2 acked, 9 dead-lettered in three commits an hour apart by the time the agent saw
pass (the agent's clock, agent/clock.py): 3 ``HTTP 400: bad`` by ``up`` while the wall
clock read 1970, 4 ``HTTP 422: odd`` by ``up`` while it read ten years ahead, 2 ``HTTP
413: big`` by ``other`` with it right; and 3 queued.
"""
import asyncio
import sqlite3
import sys
import time
from pathlib import Path

import orjson

from agent.clock import CLOCK
from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.families.lanes import NORMAL
from agent.settings import StorageConfig
from agent.spool import Spool

DAY_MS = 86_400_000
HOUR_MS = 3_600_000


def nucleus(i: int) -> Event:
    body = {"type": "event", "name": f"n{i}", "id": i, "date": "2026-11-01T00:00:00.000Z",
            "sessionId": "s1", "machineId": "m1"}
    return Event("app-1", NUCLEUS, dedupe_key("nucleus", "app-1", i), orjson.dumps(body), i,
                 NORMAL)


async def main(path: Path) -> None:
    spool = await Spool.open(StorageConfig(path=str(path)))
    assert await spool.append([nucleus(i) for i in range(14)]) == 14
    rows = await spool.fetch(spool.streams["app-1"].id, 0, 100)
    await spool.ack([rows[0].seq, rows[1].seq])
    for shift, (first, end), upstream, reason in (
            (DAY_MS - time.time_ns() // 1_000_000, (2, 5), "up", "HTTP 400: bad"),
            (3652 * DAY_MS, (5, 9), "up", "HTTP 422: odd"),
            (0, (9, 11), "other", "HTTP 413: big")):
        CLOCK.wall_shift_ms = shift
        await spool.dead_letter([(r.seq, upstream, reason) for r in rows[first:end]])
        CLOCK.passed_ms += HOUR_MS
    CLOCK.passed_ms -= HOUR_MS
    await spool.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("VACUUM")
    conn.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
