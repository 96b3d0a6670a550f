"""Logging for the agent: journald-friendly output, secret redaction, rate limits.

Under systemd, stderr goes to journald, which timestamps each line itself and
reads a ``<N>`` syslog priority prefix (sd-daemon(3)); elsewhere each line
carries an ISO-8601 UTC timestamp.  Write keys must never reach a log, and an
upstream that flaps must not flood one.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import logging
import logging.handlers
import os
import re
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote

from agent import paths
from agent.terminal import printable, printable_lines

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# sd-daemon.h: SD_CRIT, SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
# Registering a very short secret would garble every log line containing it.
MIN_SECRET_LEN = 4
# How far past its cut ``redacted_head`` reads for the generic patterns (a bare credential
# is told by a digit anywhere in it); registered secrets are looked up in the whole text.
HEAD_MARGIN = 256
REDACTED = "***"
# What an HTTP client (yarl) leaves unencoded in a URL's path: a key in an upstream's path
# shows percent-encoded in the client's errors (`Sekrit%20Key`).
_PATH_SAFE = "!$&'()*+,;=:@/"
# Other servers' JSON encoders, as SecretRegistry.add says: what each escapes, how.
_SHORT_ESCAPES = {ord(c): "\\" + e for c, e in zip('\b\f\n\r\t"\\', 'bfnrt"\\')}
_LINE_SEPARATORS = {0x2028: "\\u2028", 0x2029: "\\u2029"}
_GO = ({i: f"\\u{i:04x}" for i in (*range(0x20), *b"<>&")} | _SHORT_ESCAPES
       | _LINE_SEPARATORS)
_GSON = _GO | {i: f"\\u{i:04x}" for i in b"='"}
_DOTNET = ({i: f"\\u{i:04X}" for i in (*range(0x20), 0x7F, *b"\"&'+<>`")}
           | {i: e for i, e in _SHORT_ESCAPES.items() if i != ord('"')})

_GENERIC_SECRETS = (
    # Authorization headers, raw or in a dict repr, with or without a scheme.
    (re.compile(r"(?i)(\bauthorization\b['\"]?\s*[:=]\s*['\"]?(?:(?:basic|bearer)\s+)?)[^\s'\",;}]+"),
     r"\1" + REDACTED),
    # Bare credentials after a scheme.  A digit is required so that prose such
    # as "Basic authentication failed" is left alone.
    (re.compile(r"(?i)\b((?:basic|bearer)\s+)(?=[\w+/.~-]*\d)[\w+/.~-]{8,}=*"), r"\1" + REDACTED),
    # A URL's user:password@ (a proxy's, as HTTPS_PROXY holds it): its password, whoever's.
    # Linear: a scheme of at most 32 characters (an unbounded one was tried from each word
    # start of a run of dotted names to its end: quadratic, an hour for a 1 MB line), and
    # what follows its :// stops at the next /, so no two tries read the same authority.
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]{0,31}://[^\s/@:'\"]*:)[^\s/@'\"]+@"), r"\1" + REDACTED + "@"),
    # Write keys in query strings, JSON bodies and headers.
    (re.compile(r"(?i)(\b(?:write_?key|publicwritekey|x-write-key)['\"]?\s*[:=]\s*['\"]?)[^\s'\"&,;}]+"),
     r"\1" + REDACTED),
)


class SecretRegistry:
    """The secret values (write keys, upstream keys) that logs must never show.

    Secrets are indexed by their first ``MIN_SECRET_LEN`` characters rather than
    joined into one regex: with any local app able to invent keys, that regex was
    rebuilt for each new key (quadratic CPU; re's cache held hundreds of copies,
    about 100 KB per key) and every log line was matched against every key. Here
    a line costs one dict lookup per character, plus one set lookup per distinct
    length of the secrets sharing a prefix found in it, however many keys exist.
    """

    def __init__(self) -> None:
        self._secrets: set[str] = set()   # every form of every key
        # The keys themselves: one may equal another's form (a key "a%20b" beside "a b")
        # and still needs its own forms.
        self._keys: set[str] = set()
        # First MIN_SECRET_LEN characters -> lengths of the secrets that start so, longest
        # first, so that a secret containing another is redacted whole.
        self._lengths: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        """Redact ``value`` from now on; a too-short value only as Basic credentials."""
        value = value.strip()
        # Keys are registered again after every commit: a known one is one set lookup.
        if not value or value in self._keys:
            return
        # Segment clients send the key as HTTP Basic credentials "key:"; in a URL it is
        # percent-encoded, as a path segment or as any component. A key holding a hidden
        # character (a zero-width space pasted with it) reaches the log escaped too: by a
        # repr (a %r argument, a KeyError), or by the log's own escaping of a traceback.
        # An upstream's JSON error naming the key may escape it (``\u041a``: Python's and
        # PHP's encoders write every non-ASCII letter so; PHP's writes '/' as ``\/`` too,
        # one of a base64 token's digits). Go's encoding/json and Java's Gson (HTML-safe by
        # default) write HTML's characters in lowercase hex, Gson '=' and "'" too (a base64
        # key's padding), and leave other non-ASCII letters as they are; .NET's
        # System.Text.Json (default encoder) writes every non-ASCII letter, '"' and HTML's
        # characters (a base64 key's '+') in UPPERCASE hex. Most keys (letters and digits)
        # read the same in every one: the set holds no more forms for them.
        basic = base64.b64encode(f"{value}:".encode()).decode()
        escaped = json.dumps(value)[1:-1]
        forms = {value, basic, quote(value, safe=_PATH_SAFE), quote(value, safe=""),
                 printable(value), repr(value)[1:-1], escaped, escaped.replace("/", "\\/"),
                 value.translate(_GO), value.translate(_GSON), _dotnet(value)}
        if len(value) < MIN_SECRET_LEN:
            # Its own letters would garble every line holding them, but its Basic form
            # (an upstream may echo the Authorization header sent) is 4+ base64 digits,
            # and a non-ASCII letter percent-encoded or escaped is six characters that
            # stand for that letter only.
            shown = set() if value.isascii() else forms - {value}
            forms = {basic} | {f for f in shown if len(f) >= MIN_SECRET_LEN}
        with self._lock:
            self._keys.add(value)
            for secret in forms:
                self._secrets.add(secret)
                head = secret[:MIN_SECRET_LEN]
                lengths = self._lengths.get(head, ())
                if len(secret) not in lengths:
                    self._lengths[head] = tuple(sorted((*lengths, len(secret)), reverse=True))

    def redact(self, text: str) -> str:
        """``text`` with every registered secret and generic credential replaced."""
        if self._lengths:
            text = self._redact_registered(text)[0]
        for generic, replacement in _GENERIC_SECRETS:
            text = generic.sub(replacement, text)
        return text

    def redacted_head(self, text: str, most: int) -> str:
        """The first ``most`` characters of ``text`` redacted: redacted before the cut, so
        that a secret the cut falls in is still found whole, yet only as much of ``text``
        as that needs (an upstream's reply may be megabytes). Registered secrets are
        looked for only where one could start within the head, each in the whole of
        ``text``: the cost does not grow with the longest key registered (any app may send
        one of hundreds of KB, which made a margin that long, scanned a character at a
        time, for every name and id the live view showed)."""
        want = most + HEAD_MARGIN
        while True:
            if self._lengths:
                head, end = self._redact_registered(text, want)
            else:
                head, end = text[:want], min(want, len(text))
            for generic, replacement in _GENERIC_SECRETS:
                head = generic.sub(replacement, head)
            # A credential the generic patterns find cut at ``end`` lies in the last
            # HEAD_MARGIN characters of head (redaction only shortens what it matched,
            # before it): none of it is kept.
            if end >= len(text) or len(head) >= most + HEAD_MARGIN:
                return head[:most]
            want *= 2

    def _redact_registered(self, text: str, want: int | None = None) -> tuple[str, int]:
        """``text`` with every registered secret replaced, and how much of ``text`` that
        covers: all of it, or with ``want``, as far as gives ``want`` characters (a secret
        that starts before there is replaced whole, however far it goes)."""
        lengths_of, secrets = self._lengths, self._secrets
        parts: list[str] = []
        size = len(text)
        stop = size if want is None else want
        shown = start = i = 0   # what is replaced so far makes ``shown`` characters
        last = size - MIN_SECRET_LEN
        while i <= last and shown + i - start < stop:
            for n in lengths_of.get(text[i:i + MIN_SECRET_LEN], ()):
                if i + n <= size and text[i:i + n] in secrets:
                    parts += (text[start:i], REDACTED)
                    shown += i - start + len(REDACTED)
                    i = start = i + n
                    break
            else:
                i += 1
        end = size if i > last else i
        if not parts and end == size:
            return text, size
        parts.append(text[start:end])
        return "".join(parts), end


def _dotnet(value: str) -> str:
    """``value`` as .NET's System.Text.Json writes it in a JSON string: every non-ASCII
    character as its UTF-16 code units' ``\\uXXXX``, UPPERCASE."""
    value = value.translate(_DOTNET)
    if value.isascii():
        return value
    shown: list[str] = []
    for c in value:
        if c.isascii():
            shown.append(c)
        else:   # a letter past U+FFFF as its two surrogates
            units = c.encode("utf-16-be", "surrogatepass").hex().upper()
            shown += (f"\\u{units[i:i + 4]}" for i in range(0, len(units), 4))
    return "".join(shown)


_registry = SecretRegistry()


def register_secret(value: str) -> None:
    """Never log ``value``: the core calls this for every configured or seen key."""
    _registry.add(value)


def redact(text: str) -> str:
    """``text`` without registered secrets or credentials, for status output."""
    return _registry.redact(text)


def redacted_head(text: str, most: int) -> str:
    """The first ``most`` characters of ``redact(text)``, for a reason kept short."""
    return _registry.redacted_head(text, most)


def hiding(key: str | Iterable[str], text: str, most: int) -> str:
    """``redacted_head(text, most)`` without ``key`` (or any of several) either, in any
    form the log would show it in: a line quoting an app's values (an event id, a message's
    field) is logged while its request is handled, before a new key's commit has it
    registered, and an app may put its key in them. Not registered here: keys of requests
    refused before the spool would grow the registry for good; this costs only the lines
    that quote app values."""
    one = SecretRegistry()
    for each in (key,) if isinstance(key, str) else key:
        one.add(each)
    # Replaced whole before the cut, however far past it the key goes.
    return _registry.redacted_head(one._redact_registered(text, most + HEAD_MARGIN)[0], most)


FINGERPRINT = re.compile(r"k:[0-9a-f]{8}")   # what ``fingerprint`` returns


@functools.lru_cache(maxsize=4096)   # a tail viewer filtering by key hashes each event's key
def fingerprint(key: str) -> str:
    """What an operator's tool shows of an app key (the tail, dead letters): keys are
    credentials, and status and logs never show them. A short hash tells keys apart, and
    `outpost tail --key K` hashes K locally, so the key itself never travels in a URL."""
    return "k:" + hashlib.blake2b(key.encode(), digest_size=4).hexdigest()


class RedactingFilter(logging.Filter):
    """Replaces secrets in the rendered message, exception and stack text, then shows the
    characters a terminal obeys escaped (agent/terminal.py): app and upstream text in a
    message could otherwise forge a log line with a line break, or rewrite or hide what
    `journalctl` or `tail -f` shows (``\\x1b[2J``, a bidi override). A traceback keeps
    Python's line breaks; its exceptions' own text is escaped like a message.

    It is attached to the handler, not a logger, because logger filters do
    not see records propagated from child loggers.
    """

    def __init__(self, registry: SecretRegistry | None = None) -> None:
        super().__init__()
        self._registry = registry or _registry

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # bad args: leave the record for the handler to report
            return True
        redact = self._registry.redact
        record.msg, record.args = printable(redact(message)), None
        # From exc_info even if a handler before this one set exc_text: that is unescaped.
        # (None, None, None), exc_info=True with nothing raised, is left to logging.
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = _traceback(record.exc_info, redact)
        elif record.exc_text:
            record.exc_text = printable_lines(redact(record.exc_text))
        if record.stack_info:
            record.stack_info = printable_lines(redact(record.stack_info))
        return True


def _traceback(exc_info: _ExcInfo, redact: Callable[[str], str]) -> str:
    """As logging.Formatter.formatException writes it, redacted and escaped: each line break
    of Python's kept, but those in an exception's text (its str and notes, often a peer's
    words: an upstream's reply, a D-Bus error) escaped, as they would forge a line. (In an
    exception group's members, Python starts each line with the group's margin, `| `: those
    line breaks are kept, as they cannot start a line of their own.)"""
    shown = traceback.TracebackException(*exc_info, compact=True)
    theirs: set[str] = set()
    todo = [shown]
    while todo:   # the chain and groups, each once (TracebackException breaks cycles)
        exc = todo.pop()
        notes = exc.__notes__   # Python writes each of a note's lines as one line
        if isinstance(notes, Sequence):
            exc.__notes__ = [printable(n) if isinstance(n, str) else n for n in notes]
        theirs.update(exc.format_exception_only())
        todo += [e for e in (exc.__cause__, exc.__context__, *(exc.exceptions or ()))
                 if e is not None]
    return "".join(printable(redact(chunk[:-1])) + "\n" if chunk in theirs
                   else printable_lines(redact(chunk)) for chunk in shown.format()).rstrip("\n")


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``, the priority on every line of a traceback."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _PRIORITIES if record.levelno >= level), _DEBUG_PRIORITY)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def plain_formatter() -> logging.Formatter:
    """``2026-11-22T13:50:51Z LEVEL logger: message``, always in UTC."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    return formatter


def stderr_is_journal(stream: IO[str] | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journald stream that systemd connected us to.

    ``$JOURNAL_STREAM`` is ``device:inode`` of that stream; comparing it (as
    systemd.exec(5) advises) avoids the false positive of a child process
    that inherited the variable but has its stderr redirected.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        st = os.fstat(stream.fileno()) if stream is not None else None
    except (OSError, ValueError, AttributeError):
        st = None
    if st is None:
        return True  # no descriptor to compare: trust the variable
    return value == f"{st.st_dev}:{st.st_ino}"


_installed: logging.Handler | None = None


class _PrivateFile(logging.handlers.RotatingFileHandler):
    """The log file, and each one a rotation starts, made 0600 whatever the umask, and
    one found wider made so: it holds what the agent logs (upstreams, apps' event names)."""

    def _open(self) -> io.TextIOWrapper:
        # O_BINARY (Windows): io translates line ends already; a text-mode fd would again.
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                     | getattr(os, "O_BINARY", 0), 0o600)
        # Not on Windows, where the directory's ACL is what guards it.
        if sys.platform != "win32" and stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def setup_logging(level: str = "info", *, stream: IO[str] | None = None, journald: bool | None = None) -> None:
    """Send all logging to ``stream`` (stderr) at ``level``; safe to call again.

    ``journald`` forces the format; by default it is detected from
    ``$JOURNAL_STREAM``.  Under ``pythonw`` (a Windows task) there is no
    stderr, so the log goes to ``outpost.log`` in the data directory.
    """
    global _installed
    if level.lower() not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}")
    stream = stream if stream is not None else sys.stderr
    handler: logging.Handler
    if stream is None:
        paths.make_private_dir(paths.data_dir())
        log_file = paths.data_dir() / "outpost.log"
        handler = _PrivateFile(log_file, maxBytes=1 << 20, backupCount=3)
        journald = False
    else:
        handler = logging.StreamHandler(stream)
    if journald is None:
        journald = stderr_is_journal(stream)
    handler.setFormatter(JournalFormatter() if journald else plain_formatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed.close()
    root.addHandler(handler)
    root.setLevel(_LEVELS[level.lower()])
    logging.captureWarnings(True)
    _installed = handler


KEY_KEPT = 200   # characters of a rate-limited message's key held (RateLimiter)


class RateLimiter:
    """Admits a message key at most once per ``interval`` seconds, counting the rest.

    ``clock`` is injectable so that tests move time instead of sleeping. At most
    ``max_keys`` keys are held, each at most KEY_KEPT characters (a longer one by a hash):
    keys may hold what an app sent (its app id, up to a request line long), and an app can
    invent any number of them within the interval.
    """

    def __init__(
        self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic, max_keys: int = 1024
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # key -> (last emitted, suppressed since)
        self._lock = threading.Lock()

    def admit(self, key: tuple[str, str]) -> str | None:
        """None to suppress; otherwise the suffix to add ("" when nothing was suppressed)."""
        if len(key[1]) > KEY_KEPT:
            digest = hashlib.blake2b(key[1].encode("utf-8", "surrogatepass"), digest_size=16)
            key = (key[0], key[1][:KEY_KEPT - 33] + ":" + digest.hexdigest())
        now = self._clock()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last[0] < self.interval:
                self._seen[key] = (last[0], last[1] + 1)
                return None
            if len(self._seen) >= self._max_keys:
                self._prune(now)
            self._seen[key] = (now, 0)
        if last is None or last[1] == 0:
            return ""
        times = "time" if last[1] == 1 else "times"
        return f" (repeated {last[1]} {times} in the last {now - last[0]:.0f} s)"

    def _prune(self, now: float) -> None:
        # Keys whose window has passed would be admitted anyway; only an
        # unreported suppression count is lost, which beats unbounded memory.
        for key in [k for k, (t, _) in self._seen.items() if now - t >= self.interval]:
            del self._seen[key]
        if len(self._seen) >= self._max_keys:
            # Every key is within its window (many keys at once: an app inventing them).
            # The earliest held half goes: a key of it may be logged again early, once.
            for key in list(self._seen)[:len(self._seen) - self._max_keys // 2]:
                del self._seen[key]


_default_limiter = RateLimiter()


class LimitedRecords(logging.Filter):
    """Admits a library logger's records for which ``only`` holds once per interval per
    message and exception type, counting the rest in the next one admitted; others pass.
    aiohttp logs every request it cannot parse as an error with its traceback, so any
    local process could flood the log."""

    def __init__(self, only: Callable[[logging.LogRecord], bool],
                 limiter: RateLimiter = _default_limiter,
                 kind: Callable[[logging.LogRecord], str] | None = None) -> None:
        super().__init__()
        self.only = only
        self.limiter = limiter
        self.kind = kind or _exception_type

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.only(record):
            return True
        kind = self.kind(record)
        suffix = self.limiter.admit((record.name, f"{record.msg}:{kind}"))
        if suffix:
            record.msg = f"{record.msg}{suffix}"
        return suffix is not None


def _exception_type(record: logging.LogRecord) -> str:
    return record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""


class RewordedRecords(logging.Filter):
    """Logs a library logger's records for which ``only`` holds as ``reword`` says, without
    their exception: for errors whose text quotes what a client sent."""

    def __init__(self, only: Callable[[logging.LogRecord], bool],
                 reword: Callable[[logging.LogRecord], str]) -> None:
        super().__init__()
        self.only = only
        self.reword = reword

    def filter(self, record: logging.LogRecord) -> bool:
        if self.only(record):
            record.msg, record.args = self.reword(record), None
            record.exc_info, record.exc_text = None, None
        return True


def limit_library_log(name: str, only: Callable[[logging.LogRecord], bool],
                      reword: Callable[[logging.LogRecord], str] | None = None,
                      kind: Callable[[logging.LogRecord], str] | None = None) -> None:
    """Rate-limit the records of logger ``name`` (a library's) for which ``only`` holds, as
    log_limited does ours, per ``kind`` (default: their exception's type), and log those
    admitted as ``reword`` says (without their exception) if given; once per logger,
    however often it is called."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, LimitedRecords) for f in logger.filters):
        logger.addFilter(LimitedRecords(only, kind=kind))
        if reword is not None:   # after the limit, which tells records by their exception
            logger.addFilter(RewordedRecords(only, reword))


def log_limited(
    logger: logging.Logger,
    level: int,
    key: str,
    msg: str,
    *args: object,
    limiter: RateLimiter | None = None,
    **kwargs: Any,
) -> None:
    """``logger.log(level, msg, *args)`` at most once per interval per (logger, key).

    e.g. ``log_limited(log, logging.WARNING, "upstream-down:nucleus",
    "upstream %s unreachable: %s", name, err)``.
    """
    if not logger.isEnabledFor(level):
        return
    suffix = (limiter or _default_limiter).admit((logger.name, key))
    if suffix is None:
        return
    kwargs.setdefault("stacklevel", 2)  # attribute the record to our caller
    logger.log(level, msg + suffix, *args, **kwargs)
