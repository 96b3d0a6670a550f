"""Move a corrupt spool aside so that a salvage cut short is finished at the next start.

A marker beside the spool (``<name>.salvaging``) names the file moved aside (in a
symbolic link's target when a full disk has no room for it as text). It is made
durable before the move and removed only once the salvage has committed into the fresh
spool (or, when the copy failed, once its loss is counted there). At the next start a
marker whose file exists means "finish that salvage"; one whose file does not exist is
stale: the crash came before the move, and the corrupt file is still at the spool's path.

The copy of a spool deleted or replaced under the agent is noted with ``clear`` as soon as
it is made, before the file the agent had open is let go: the path still holds that file's
-wal or a file put there. Until it is cleared (which may fail for as long as the agent
runs) the marker says so, and a start clears it before it opens a fresh spool there.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import time
from pathlib import Path

from agent.paths import sync_dir

# A spool's files: the database, and the WAL and shared-memory index SQLite keeps beside it.
SUFFIXES = ("", "-wal", "-shm")


def marker(path: Path) -> Path:
    return path.with_name(f"{path.name}.salvaging")


def target(path: Path) -> Path:
    """Where a corrupt spool is moved: ``<name>.corrupt-<ts>``, or ``<name>.corrupt-<ts>.<n>``
    when a file kept before has that name (moved aside in the same second, or at a boot
    of a device without a battery-backed clock that started from the same saved time): a
    rename onto it would replace it."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    n = 0
    while True:
        moved = path.with_name(f"{path.name}.corrupt-{stamp}{f'.{n}' if n else ''}")
        if not any(os.path.lexists(f"{moved}{suffix}") for suffix in SUFFIXES):
            return moved
        n += 1


# The marker's line after the name of a copy whose path is still to be cleared.
CLEAR = "clear"
# More than any marker holds (a file name, of at most 255 bytes, and CLEAR): a marker read
# no further (a huge file put there) names no file.
MARKER_BYTES = 4096


def note(path: Path, moved: Path, clear: bool = False) -> OSError | None:
    """Write the marker naming ``moved`` (and ``clear``), durably; the error when it
    cannot (a full disk)."""
    text = f"{moved.name}\n" + (f"{CLEAR}\n" if clear else "")
    try:
        # Made anew: a marker left as a link (below) must not be followed, and the file
        # it names written over.
        marker(path).unlink(missing_ok=True)
        fd = os.open(marker(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            # The newline ends the name: a marker cut short by a crash names no file.
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        sync_dir(path.parent)
    except OSError as exc:
        # A full disk has no block for the name; a symbolic link that short keeps it in
        # its inode (ext4, tmpfs). Without it, a stop before there is room for the fresh
        # spool left the moved file to no salvage, its queue lost uncounted.
        try:
            marker(path).unlink(missing_ok=True)
            os.symlink(text.removesuffix("\n"), marker(path))
            sync_dir(path.parent)
        except OSError:
            return exc
    return None


def move_aside(path: Path, moved: Path) -> None:
    """Rename a spool and its WAL/SHM files to ``moved`` (noted first)."""
    _rename(path, moved)
    sync_dir(path.parent)


def copy_open(conn: sqlite3.Connection, moved: Path) -> str | None:
    """Copy the spool ``conn`` has open, whole, to ``moved``, durably: when its file is no
    longer at the path (deleted, or replaced), the open connection is all that holds its
    queue. Why it cannot (no room, a directory no longer writable), nothing left at
    ``moved``; None once copied."""
    try:
        os.close(os.open(moved, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        with contextlib.closing(sqlite3.connect(moved)) as out:
            conn.backup(out)
        fd = os.open(moved, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (sqlite3.Error, OSError) as exc:
        for suffix in ("", "-journal"):
            with contextlib.suppress(OSError):   # where none could be made, none to remove
                Path(f"{moved}{suffix}").unlink(missing_ok=True)
        return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    return None


def forget_wal(path: Path) -> None:
    """Remove the -wal and -shm of a spool file deleted or replaced while open: SQLite
    leaves them at the path when its file has moved, and read with a file put there they
    would garble it."""
    for suffix in SUFFIXES[1:]:
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    sync_dir(path.parent)


def move_fresh_aside(path: Path, moved: Path) -> None:
    """Rename the damaged fresh spool of a salvage not finished to ``moved``, its -wal and
    -shm first: cut between the renames, the next start must not take a -wal left at the
    path for the marker's file's (``pending``), and write it over that file's own."""
    for suffix in reversed(SUFFIXES):
        src = Path(f"{path}{suffix}")
        if os.path.lexists(src):
            src.rename(Path(f"{moved}{suffix}"))
    sync_dir(path.parent)


def pending(path: Path) -> tuple[Path, bool] | None:
    """The file moved aside by a salvage that did not finish, its move completed, and
    whether the path is still to be cleared for its fresh spool (``note``'s ``clear``);
    None when there is none (a stale marker is removed)."""
    named = _named(path)
    if named is None:
        return None
    moved, clear = named
    if moved is None or not moved.exists():
        done(path)
        return None
    if clear:   # a copy: what is at the path is no file of its own
        return moved, True
    if not path.exists():
        # Cut between the renames: the -wal and -shm still at the path are the moved
        # file's. Applied to the fresh spool, its WAL would garble it.
        _rename(path, moved)
        sync_dir(path.parent)
    return moved, False


def waiting(path: Path) -> tuple[Path, bool] | None:
    """The file a salvage still to be finished moved aside, and whether the path is still
    to be cleared, as ``pending`` finds them, but read only (a stopped agent's `outpost
    dead` commands): None when there is none."""
    named = _named(path)
    if named is None or named[0] is None or not named[0].exists():
        return None
    return named[0], named[1]


def _named(path: Path) -> tuple[Path | None, bool] | None:
    """What the marker names (None: no file of this directory) and whether its path is to
    be cleared; None when there is no marker."""
    try:
        # A link is made whole (note): its name needs no newline to end it.
        text = f"{os.readlink(marker(path))}\n" if marker(path).is_symlink() else \
            _marker_text(marker(path))
    except FileNotFoundError:
        return None
    name, ended, rest = text.partition("\n")
    clear = rest == f"{CLEAR}\n"
    # A name of this directory only (Path(name).name splits it at the OS's separators).
    moved = path.with_name(name) if ended and (clear or not rest) and "\0" not in name \
        and name.startswith(f"{path.name}.corrupt-") and Path(name).name == name else None
    return moved, clear


def _marker_text(found: Path) -> str:
    """The text of the marker file ``found``: "" (naming no file, so stale) when it is no
    regular file. Opened without waiting, and read no further than a name and ``CLEAR``:
    a FIFO there held every offline command and the agent's start forever."""
    fd = os.open(found, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return fh.read(MARKER_BYTES).decode("utf-8", "replace")


def done(path: Path) -> None:
    """The salvage has committed: forget its marker (the fresh spool made durable first)."""
    sync_dir(path.parent)
    marker(path).unlink(missing_ok=True)
    sync_dir(path.parent)


def _rename(path: Path, target: Path) -> None:
    # The file first: while it is still at the path, its -wal and -shm must stay with it.
    # A symbolic link put there is renamed itself (rename(2) does not follow it), dangling
    # or not: exists() skipped a dangling one, and the fresh spool was made through it.
    for suffix in SUFFIXES:
        src = Path(f"{path}{suffix}")
        if os.path.lexists(src):
            src.rename(Path(f"{target}{suffix}"))
