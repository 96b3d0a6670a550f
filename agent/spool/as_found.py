"""An offline command leaves the files beside a spool as it found them.

A read-only connection to a WAL file makes a -wal and a -shm beside it, and leaves them
at its close: the last connection removes them only after a checkpoint, which a read-only
one may not make (nor does one in exclusive locking mode remove a -shm it did not use). So
`outpost status` and the `outpost dead` commands on a stopped agent's spool left files a
user would wonder about. ``as_found`` removes those the command made once its connections
are closed, as SQLite's last connection does: only while no connection to the file is open
(an agent's, another command's), and holding off any new one until they are gone. A -wal
with commits in it is never removed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# The lock bytes of SQLite's unix locking (os_unix.c; the file format's lock-byte page):
# every connection to a WAL file holds a read lock on the shared range while it is open,
# and the last one, before it deletes the -wal and -shm, a write lock on it.
PENDING_BYTE = 0x40000000
SHARED_FIRST = PENDING_BYTE + 2
SHARED_SIZE = 510


@contextlib.contextmanager
def as_found(spool: Path) -> Iterator[None]:
    """Around an offline command's use of ``spool``; every connection to it the command
    opened must be closed when the block ends (closing the descriptor locked here would let
    go of their locks too: POSIX locks are the process's)."""
    real = Path(os.path.realpath(spool))   # SQLite makes its files beside the file itself
    made = [p for p in (Path(f"{real}-wal"), Path(f"{real}-shm")) if not os.path.lexists(p)]
    try:
        yield
    finally:
        made = [p for p in made if os.path.lexists(p)]
        if made and sys.platform != "win32":   # (the spool opened only if it made any)
            _remove(real, made)


def _remove(spool: Path, made: list[Path]) -> None:
    import fcntl
    try:
        fd = os.open(spool, os.O_RDWR)   # a write lock needs it; nothing is written
    except OSError:   # gone, or not this user's to write: left, as SQLite would leave them
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, SHARED_SIZE, SHARED_FIRST)
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                if not (path.name.endswith("-wal") and path.stat().st_size):
                    path.unlink()   # (a -wal an agent has written to since, kept)
    except OSError:   # a connection is open, whose files they are now; or an unlink failed
        pass
    finally:
        os.close(fd)   # lets go of the lock
