"""Async test helpers: polling for a condition, running the CLI; both bounded in time."""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def wait_for(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0,
                   every: float = 0.02) -> None:
    """Return once ``cond()`` holds (awaited when it is a coroutine, e.g. a /status read),
    looked at ``every`` seconds (a cheap one waited for in a loop: less, as each wait loses
    half of it on average); fail the test after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):  # a read that never answers is bounded too
            while not await _holds(cond):
                await asyncio.sleep(every)
    except TimeoutError:
        raise AssertionError("condition not met in time") from None


async def _holds(cond: Callable[[], bool | Awaitable[bool]]) -> bool:
    held = cond()
    return await held if inspect.isawaitable(held) else held


async def run_outpost(*args: str, timeout: float = 30.0) -> tuple[int, str]:
    """The real `python -m agent` CLI in a subprocess, so it may block on HTTP while the
    agent under test runs in this event loop; returns (exit code, stdout + stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode()
