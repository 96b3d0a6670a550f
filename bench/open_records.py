"""Opening a spool of one-event records, beside the same events packed 100 to a record:
`python -m bench.open_records [--records 500000] [--keys 1000]`.

Apps that post one event at a time, on many keys, leave a record per event (a commit
packs each key's events of that commit into one record). Two spools of ``--records``
events are filled through the Spool API: one commit of ``--keys`` events, one per key,
at a time (a record each), and 100-event commits of one key at a time (a record of 100).
Each is then opened in a fresh process, which prints the time to open (and the CPU time
of all its threads: the machines are shared and noisy), its peak RSS
(VmHWM: ru_maxrss would start from its parent's, not being reset by exec) and its
anonymous RSS once open; the packed spool is the same-run reference.
Bounded: the fills and the opens stop by themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.settings import StorageConfig
from agent.spool import Spool

PACKED = 100   # events a record in the reference spool

_OPEN = """
import asyncio, json, sys, time
from agent.settings import StorageConfig
from agent.spool import Spool

async def main() -> None:
    started, cpu = time.perf_counter(), time.process_time()
    spool = await Spool.open(StorageConfig(path=sys.argv[1]))
    took, cpu = time.perf_counter() - started, time.process_time() - cpu
    status = open("/proc/self/status").read()
    kb = {name: int(status.split(name + ":")[1].split()[0]) for name in ("RssAnon", "VmHWM")}
    print(json.dumps({"open_s": took, "open_cpu_s": cpu, "depth": spool.depth, "anon_kb": kb["RssAnon"],
                      "peak_kb": kb["VmHWM"]}))
    await spool.close()

asyncio.run(main())
"""


def _event(key: str, n: int) -> Event:
    body = b'{"type":"event","name":"e","id":%d,"date":"2026-01-01T00:00:00.000Z"}' % n
    return Event(key, NUCLEUS, dedupe_key(key, n), body, n)


async def fill(path: Path, records: int, keys: int, per_record: int) -> None:
    """``records`` events: commits of ``keys`` keys with ``per_record`` events each."""
    spool = await Spool.open(StorageConfig(path=str(path), sync="normal"))
    try:
        n = 0
        while n < records:
            batch = [_event(f"k{k}", n + k * per_record + i)
                     for k in range(keys) for i in range(per_record)]
            await spool.append(batch)
            n += len(batch)
    finally:
        await spool.close()


def opened(path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _OPEN, str(path)], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    return dict(json.loads(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--keys", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name, keys, per_record in (("one event a record", args.keys, 1),
                                       (f"{PACKED} events a record", 1, PACKED)):
            path = Path(tmp) / f"{per_record}.db"
            started = time.perf_counter()
            asyncio.run(fill(path, args.records, keys, per_record))
            filled = time.perf_counter() - started
            got = opened(path)
            rows.append((name, got))
            print(f"{name:>22}: filled in {filled:.1f} s, {path.stat().st_size / 1e6:.1f} MB; "
                  f"open {got['open_s']:.2f} s ({got['open_cpu_s']:.2f} s CPU), "
                  f"depth {got['depth']:,.0f}, "
                  f"peak RSS {got['peak_kb'] / 1e3:.0f} MB, anon once open "
                  f"{got['anon_kb'] / 1e3:.0f} MB", flush=True)
        (_, one), (_, packed) = rows
        print(f"one event a record / packed: open {one['open_s'] / packed['open_s']:.2f}x "
              f"({one['open_cpu_s'] / packed['open_cpu_s']:.2f}x CPU), "
              f"peak RSS {one['peak_kb'] / packed['peak_kb']:.2f}x")


if __name__ == "__main__":
    main()
