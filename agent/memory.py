"""Handing freed memory back to the OS after a burst of ingest (glibc only).

Two things kept RSS at its peak long after a burst had been committed:

- Python's small-object allocator takes memory from the OS in 1 MiB arenas and
  returns an arena only once every object in it is freed. A burst fills dozens
  of arenas with short-lived events, and the few long-lived objects created
  meanwhile (a forwarder's batch, a log record) pin them: measured, RSS crept
  up by 4 to 7 MB with each burst of 4 MiB Nucleus posts and never came back.
  ``outpost run`` therefore re-executes itself with ``PYTHONMALLOC=malloc`` on
  glibc, so that objects come from the C allocator, which can hand back any
  free page; measured, the same bursts then leave RSS within 6 MB of idle, at
  no measurable cost in throughput (bench/RESULTS.md). An explicit
  ``PYTHONMALLOC`` in the environment is left alone.
- The C allocator keeps freed memory in its free lists; ``malloc_trim`` returns
  it. The admission control calls it once nothing is in flight after a burst.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from collections.abc import Callable


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def use_c_allocator() -> None:
    """Re-execute this process with ``PYTHONMALLOC=malloc`` (glibc, when not set).

    Called by ``outpost run`` before anything starts: the process keeps its pid,
    arguments and environment (a service manager sees no difference).
    """
    if "PYTHONMALLOC" in os.environ or malloc_trim() is None:
        return
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
