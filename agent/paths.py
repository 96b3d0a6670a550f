"""Where Outpost keeps its config and spool, following platformdirs.

A system service (run as root, or with OUTPOST_SYSTEM=1 as the packaged units
set) uses the site-wide directories; everyone else gets per-user ones.  On
Linux the site-wide ones are the FHS /etc/outpost and /var/lib/outpost that
the systemd unit's ConfigurationDirectory= and StateDirectory= create, not
platformdirs' XDG fallbacks (/etc/xdg/outpost, /usr/local/share/outpost).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import platformdirs

APP = "outpost"
LINUX_SYSTEM_CONFIG = Path("/etc") / APP
LINUX_SYSTEM_DATA = Path("/var/lib") / APP


def is_system_service() -> bool:
    """True when Outpost should use the machine-wide locations."""
    flag = os.environ.get("OUTPOST_SYSTEM")
    if flag is not None:   # "no" is no, as systemd reads its own booleans
        return flag.strip().lower() not in ("", "0", "false", "no", "off")
    return sys.platform != "win32" and hasattr(os, "geteuid") and os.geteuid() == 0


class NoHome(RuntimeError):
    """No home directory to put the per-user config and data in (HOME unset or relative,
    and no passwd entry for this uid, as for an arbitrary uid in a container)."""

    def __init__(self) -> None:
        uid = f"uid {os.getuid()}" if hasattr(os, "getuid") else "this user"
        super().__init__(f"cannot tell this user's home directory: HOME is unset or not "
                         f"absolute, and {uid} has no passwd entry; set HOME (or "
                         "XDG_CONFIG_HOME and XDG_DATA_HOME) to an absolute path")


def home() -> Path:
    """The user's home directory; NoHome where there is none to tell."""
    try:
        return Path.home()
    except RuntimeError:
        raise NoHome() from None


def _locate(system: bool | None, env_var: str, linux_system: Path,
            site: Callable[..., str], user: Callable[..., str]) -> Path:
    system = is_system_service() if system is None else system
    env = os.environ.get(env_var)
    if system and env:
        return Path(env.split(":")[0])
    if system:
        return linux_system if sys.platform.startswith("linux") else Path(
            site(APP, appauthor=False))
    try:
        return Path(user(APP, appauthor=False))
    except RuntimeError:   # platformdirs: "could not determine the home directory"
        raise NoHome() from None


def config_dir(system: bool | None = None) -> Path:
    """The directory holding agent.toml (systemd sets CONFIGURATION_DIRECTORY)."""
    return _locate(system, "CONFIGURATION_DIRECTORY", LINUX_SYSTEM_CONFIG,
                   platformdirs.site_config_dir, platformdirs.user_config_dir)


def data_dir(system: bool | None = None) -> Path:
    """The directory holding the spool (systemd sets STATE_DIRECTORY)."""
    return _locate(system, "STATE_DIRECTORY", LINUX_SYSTEM_DATA,
                   platformdirs.site_data_dir, platformdirs.user_data_dir)


_NOT_FILES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a fifo"),
              (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def not_a_file(mode: int) -> str | None:
    """What a file of this st_mode is, "a fifo" say, when not a regular file; else None."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _NOT_FILES if test(mode)), "special")


def directory_meant(written: str) -> str | None:
    """For a file's name as the operator wrote it, the directory it names instead ("data/",
    "data/.", "data/./": data), else None. Path drops the slash and a last ".", and a FILE
    named data would be made where the operator looks for a directory holding one."""
    last = written.replace(os.sep, "/").rsplit("/", 1)[-1]
    return os.path.normpath(written) if written and last in ("", ".", "..") else None


def planted_link(path: Path) -> str | None:
    """Why ``path`` may not be written through: a link on it (as named) that another user
    made in a sticky directory every user may write to (/tmp), and that directory's owner
    did not either. The kernel's protected_symlinks refuses to follow such a link, but a
    command that resolves links itself (realpath, to write beside the file a link names)
    only reads it: without this, `config init --path /tmp/agent.toml` run as root replaced
    whatever file another user's link there named. None where there is no such link."""
    if sys.platform == "win32":
        return None
    here = Path(os.path.abspath(path))
    for step in (*reversed(here.parents), here):
        try:
            link = os.lstat(step)
            if not stat.S_ISLNK(link.st_mode):
                continue
            shared = os.stat(step.parent)
        except OSError:   # nothing there, or not ours to look at: nothing to follow
            return None
        if shared.st_mode & stat.S_ISVTX and shared.st_mode & stat.S_IWOTH \
                and link.st_uid not in (os.geteuid(), shared.st_uid):
            return (f"{step} is another user's link in a directory every user may write "
                    "to: not followed; name a file of your own")
    return None


def same_file(target: Path, other: Path) -> bool:
    """Whether ``target`` is ``other``: by path through symlinks, or by inode (a hard link)."""
    if os.path.realpath(target) == os.path.realpath(other):
        return True
    try:
        return os.path.samefile(target, other)
    except OSError:   # either not there
        return False


def spool_lock(spool: Path) -> Path:
    """The lock file `outpost run` holds (flock, exclusive) for its life: one agent a spool.
    Beside the file the path resolves to, as SQLite opens it (its -wal goes there too): a
    storage.path naming a symlink to a spool in use locked a file of its own beside the
    link, and a second agent ran on that spool."""
    return Path(f"{os.path.realpath(spool)}.lock")


def device_id_file(spool: Path) -> Path:
    """Where the agent keeps the machine id it made, on a machine whose OS has none (a
    container with no /etc/machine-id): in the spool's directory, its state."""
    return spool.parent / "outpost-device-id"


def agent_holds(spool: Path) -> bool:
    """Whether an agent runs on ``spool``, wherever it listens: its lock file is held. A
    shared lock is tried and let go at once; an agent starting meanwhile waits it out."""
    if sys.platform == "win32":   # msvcrt's locks: not asked; the commands say what they did
        return False
    import fcntl
    try:
        # Without waiting: a FIFO put there waits for a writer at a plain open.
        fd = os.open(spool_lock(spool), os.O_RDONLY | os.O_NONBLOCK)
    except OSError:   # none (no agent ever ran here), or not ours to open
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:   # a file system without flock: cannot tell
        return False
    finally:
        os.close(fd)   # releases the shared lock, if taken
    return False


def lock_again(lock: Path, held: tuple[int, int] | None
               ) -> tuple[int, tuple[int, int]] | None:
    """A spool's lock file ``lock`` taken (flock, exclusive) when it is not the one this
    agent holds (``held``: its st_dev and st_ino): removed with the spool's directory under
    the running agent, whose lock stayed on the removed file, a second agent would start;
    and so with one found there again (left by an agent that ran meanwhile and stopped). Its
    descriptor, to keep open while the agent runs, and identity; None when the one held is
    there. OSError when it cannot be taken (BlockingIOError: another agent holds it)."""
    if sys.platform == "win32":   # a file open there cannot be removed
        return None
    import fcntl
    with contextlib.suppress(FileNotFoundError):
        found = os.stat(lock)
        if (found.st_dev, found.st_ino) == held:
            return None
    fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)   # as O_EXCL did
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        taken = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, (taken.st_dev, taken.st_ino)


def sqlite_uri(path: Path, query: str) -> str:
    """The SQLite URI of ``path`` with ``query`` ("mode=ro"). The path is percent-encoded
    from its bytes: SQLite decodes %xx in a URI, ends its path at a ``?`` or ``#`` (a
    storage.path such as ``/srv/take#2/spool.db`` was then ``/srv/take``, opened read-write
    and created), and a name that is not UTF-8 (kept by Python as lone surrogates) has no
    text to encode."""
    return f"file:{quote(os.fsencode(path))}?{query}"


def default_spool_path() -> Path:
    return data_dir() / "spool.db"


def make_private_dir(path: Path) -> bool:
    """Create ``path`` and any missing parents, each one made 0700 (the XDG rule): the
    spool holds user data. Directories that exist keep their modes (storage.path =
    "~/outpost.db" must not change the home directory's). Whether ``path`` existed."""
    # mkdir -p would make the parents with the umask's mode (often 0755).
    for made in reversed([p for p in path.parents if not p.exists()]):
        made.mkdir(mode=0o700, exist_ok=True)
    existed = path.exists()
    path.mkdir(mode=0o700, exist_ok=True)   # a file in its place raises, as mkdir -p does
    if not existed and sys.platform != "win32":
        os.chmod(path, 0o700)   # whatever the umask
    return existed


def spool_file(spool: Path) -> Path:
    """The file storage.path names: a symlink's target (a spool moved to a bigger disk and
    linked back), beside which SQLite keeps its -wal and -shm, and a damaged one is moved
    aside and a fresh one made (the link kept); ``spool`` itself otherwise."""
    return Path(os.path.realpath(spool)) if os.path.islink(spool) else spool


def make_spool_dir(spool: Path) -> None:
    """``make_private_dir`` of the spool's directory and, when storage.path is a symlink (a
    spool moved to a bigger disk and linked back), of the one the file it names goes in:
    SQLite and the lock file write there, and made by them it had the umask's mode."""
    make_private_dir(spool.parent)
    real = spool_file(spool).parent
    if real != spool.parent:
        make_private_dir(real)


def make_private_file(path: Path) -> None:
    """A file of the spool's made 0600 if found with a wider mode (a backup restored without
    its modes). Only a regular file: a link (to /dev/null, say) is not followed."""
    if sys.platform == "win32":   # no such modes
        return
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(found.st_mode) and stat.S_IMODE(found.st_mode) & 0o077:
        os.chmod(path, 0o600)


def exposure(path: Path) -> str | None:
    """A warning if others can list or write to the directory ``path`` (the files in it are
    0600), else None (also when it is not there)."""
    if sys.platform == "win32":
        return None
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if mode & 0o022:
        return (f"{path} is writable by other users (mode {mode:o}): they can delete, rename "
                "or plant files beside the spool; chmod 700 it, or give storage.path a "
                "private directory")
    if mode & 0o044:
        return (f"{path} is readable by other users (mode {mode:o}): they can list the names "
                "of the files in it, not read them (0600); chmod 700 it to hide them")
    return None


def sync_dir(directory: Path) -> None:
    """Make renames, creations and removals in ``directory`` durable."""
    if sys.platform == "win32":  # no directory handles to fsync; NTFS journals them
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
