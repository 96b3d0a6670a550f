"""Ctrl-C while the agent's modules load is taken once they have.

Raised as KeyboardInterrupt in the middle of a C extension's initialisation (orjson's), an
interrupt crashed the process (SIGSEGV, about 1 in 3 interrupts in the first second of
`outpost run`). Until ``taken`` is called, SIGINT only sets a flag. Imports nothing of the
agent: ``python -m agent`` installs it before importing anything else.
"""

from __future__ import annotations

import signal
from types import FrameType

_interrupted = False


def _note(signum: int, frame: FrameType | None) -> None:
    global _interrupted
    _interrupted = True


def defer() -> None:
    """From now on, SIGINT only notes that it came."""
    signal.signal(signal.SIGINT, _note)


def taken() -> bool:
    """SIGINT raises KeyboardInterrupt again; whether one came while deferred."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return _interrupted
