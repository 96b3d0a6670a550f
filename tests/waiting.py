"""Polling for a condition in async tests, bounded in time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    """Return once ``cond()`` holds; fail the test after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
