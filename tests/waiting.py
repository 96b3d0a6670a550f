"""Async test helpers: polling for a condition, running the CLI (both bounded in time), and
measuring how long one turn of the event loop ran."""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent


async def wait_for(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0,
                   every: float = 0.02) -> None:
    """Return once ``cond()`` holds (awaited when it is a coroutine, e.g. a /status read),
    looked at ``every`` seconds (a cheap one waited for in a loop: less, as each wait loses
    half of it on average); fail the test after ``timeout`` seconds. The failure says how
    often ``cond`` was looked at and the longest stretch between two looks: one of about
    ``timeout`` is an event loop (or a whole process) that did not run, and no sign that
    the code under test stalled."""
    loop = asyncio.get_running_loop()
    looks, last = 0, loop.time()
    longest = 0.0
    try:
        async with asyncio.timeout(timeout):  # a read that never answers is bounded too
            while not await _holds(cond):
                now = loop.time()
                looks, longest, last = looks + 1, max(longest, now - last), now
                await asyncio.sleep(every)
    except TimeoutError:
        longest = max(longest, loop.time() - last)
        raise AssertionError(f"condition not met in time (looked at {looks} times; the "
                             f"longest stretch between looks {longest:.2f}s)") from None


def serving() -> bool:
    """Whether an aiohttp server task of this process is still serving a connection."""
    return any(getattr(t.get_coro(), "__qualname__", "") == "RequestHandler.start"
               for t in asyncio.all_tasks())


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


class LoopTurns:
    """``async with LoopTurns() as turns:`` ... ``turns.worst``: the most CPU time the event
    loop's thread ran between two looks, every ``every`` seconds, at the loop
    (time.thread_time: what a turn held the loop, whatever the load on the machine; a
    wall-clock gap also stretches while other processes have the cores). Between two looks
    the loop may run several turns: ``worst`` is at least the longest of them (with
    ``every=0``, a look every turn: the longest itself)."""

    def __init__(self, every: float = 0.005) -> None:
        self.every = every
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopTurns:
        self._task = asyncio.create_task(self._look())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _look(self) -> None:
        last = time.thread_time()
        while True:
            await asyncio.sleep(self.every)
            now = time.thread_time()
            self.worst, last = max(self.worst, now - last), now
