"""Which allocator ``outpost run`` runs on (glibc's, when there is one; see memory.py).

Kept apart from memory.py so that the entry point can decide, and re-execute, before it
imports anything else: the modules imported before an ``execve`` are paid for twice."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux") or not _glibc():
        return None
    try:
        # The running process's own symbols, glibc's among them, whatever its soname
        # (libc.so.6.1 on some architectures); find_library would run ldconfig.
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def _glibc() -> bool:
    """``platform.libc_ver()[0] == "glibc"``, asking glibc first as libc_ver does, without
    importing platform where glibc answers: its regexes cost `run` 3-10 ms of its start
    (the more, the busier the machine) before the re-execution, for this alone."""
    try:
        if (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc "):
            return True
    except (ValueError, OSError):
        pass
    # Elsewhere (musl), as before: libc_ver looks in the executable's bytes.
    import platform
    return platform.libc_ver()[0] == "glibc"


def use_c_allocator() -> None:
    """Re-execute this process with ``PYTHONMALLOC=malloc`` (glibc, when not set).

    Called by ``outpost run`` first thing, before the agent's modules are imported
    (agent/__main__.py): the process keeps its pid, arguments and environment (a
    service manager sees no difference).
    """
    if "PYTHONMALLOC" in os.environ or malloc_trim() is None:
        return
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        pass  # run on as we are: only the memory hand-back is less thorough
