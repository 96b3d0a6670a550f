"""Ctrl-C while the agent's modules load is taken once they have; so is a reload (SIGHUP)
before ``outpost run`` handles it.

Raised as KeyboardInterrupt in the middle of a C extension's initialisation (orjson's), an
interrupt crashed the process (SIGSEGV, about 1 in 3 interrupts in the first second of
`outpost run`). Until ``taken`` is called, SIGINT only sets a flag. A SIGHUP's default
action ended the agent (systemd counts that end as clean: no restart); until the agent's
own handler replaces it, it too only sets a flag, read by ``reload_asked``. Imports nothing
of the agent: ``python -m agent`` installs it before importing anything else.
"""

from __future__ import annotations

import signal
from types import FrameType

_interrupted = False
_reload = False


def _note(signum: int, frame: FrameType | None) -> None:
    global _interrupted
    _interrupted = True


def _note_reload(signum: int, frame: FrameType | None) -> None:
    global _reload
    _reload = True


def _deferred(reloads: bool) -> set[signal.Signals]:
    return {signal.SIGINT, signal.SIGHUP} if reloads and hasattr(signal, "SIGHUP") \
        else {signal.SIGINT}


def defer(reloads: bool = False) -> None:
    """From now on, SIGINT only notes that it came; with ``reloads`` (``outpost run``),
    SIGHUP too. Either held for an exec (``hold_for_exec``) comes now."""
    signal.signal(signal.SIGINT, _note)
    if reloads and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _note_reload)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _deferred(reloads))


def hold_for_exec() -> None:
    """Before ``outpost run`` re-executes itself (agent/server/allocator.py): the new image
    takes SIGINT and SIGHUP by their default actions, the agent's end, until its own
    ``defer``. Blocked, they wait through the exec (the signal mask and the pending
    signals are kept) for that ``defer``; one noted already is raised again to wait too."""
    if not hasattr(signal, "pthread_sigmask"):   # Windows: no exec either
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, _deferred(reloads=True))
    if _interrupted:
        signal.raise_signal(signal.SIGINT)
    if _reload:
        signal.raise_signal(signal.SIGHUP)


def taken() -> bool:
    """SIGINT raises KeyboardInterrupt again; whether one came while deferred."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return _interrupted


def reload_asked() -> bool:
    """Whether a SIGHUP came while deferred: the config read at the start may predate it."""
    return _reload
