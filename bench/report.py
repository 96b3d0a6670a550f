"""The machine description and the results table (its rows: bench/rows.py)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .rows import rows


def machine(workdir: Path) -> dict[str, Any]:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(),
            "ram_gb": round(mem_kb / 1024 / 1024, 1), "disk": _disk(workdir),
            "kernel": platform.release(), "python": platform.python_version()}


def _disk(path: Path) -> str:
    """The device and filesystem holding the spool (tmpfs would make fsync free)."""
    best = ("", "", "")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fs = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) >= len(best[1]):
                best = (dev, mnt, fs)
    dev, mnt, fs = best
    rot = ""
    name = os.path.basename(dev)
    sysfs = Path(f"/sys/block/{name}/queue/rotational")
    if sysfs.exists():
        rot = ", rotational" if sysfs.read_text().strip() == "1" else ", non-rotational"
    return f"{dev} {fs} on {mnt}{rot}"


def table(r: dict[str, Any]) -> str:
    head = ("figure", "Outpost", "CPU s per million events", "same-run reference (ratio)",
            "target", "met")
    body = rows(r)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in body]
    return "\n".join(lines)
