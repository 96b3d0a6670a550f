"""Text from apps and upstreams, made safe to print on an operator's terminal.

An app's event id or an upstream's error text may hold escape sequences that a terminal
obeys (clear the screen, set the window title, recolour what follows), or characters it
obeys without showing them (a bidi override shows ``txt\\u202eexe.js`` as ``txtsj.exe``):
every command prints such values through ``printable_value``, or its JSON through
``printable_json``; the agent's log (agent/logs.py), read on a terminal too, shows each
record's message through ``printable`` and a traceback through ``printable_lines``.

And where a command's output goes may fail (`outpost status > file` on a full disk):
``guard_stdout`` makes those failures an ``OutputError``, told apart from any other.
"""

from __future__ import annotations

import codecs
import io
import re
import sys
import unicodedata

# Shown escaped: controls (Cc: C0, DEL, C1), which a terminal acts on; format characters
# (Cf: bidi overrides, embeddings, isolates and marks, zero-width ones), and line and
# paragraph separators (Zl, Zp), which change or hide what is shown around them; lone
# surrogates (Cs), which have no glyph and would not even encode.
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Where to look for them: everything else is printable ASCII. JSON text may hold C0
# only as the whitespace between its tokens (json.dumps escapes them in strings).
_SUSPECT = re.compile(r"[^\x20-\x7e]")
_JSON_SUSPECT = re.compile(r"[^\x00-\x7e]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _hidden(c: str) -> bool:
    return unicodedata.category(c) in _HIDDEN


def _escape(match: re.Match[str]) -> str:
    """As Python's repr escapes it (``\\x1b``, ``\\u202e``, ``\\U000e0041``), so a name
    shown by repr and an id shown by ``printable`` read alike."""
    c = match.group()
    if not _hidden(c):
        return c
    return _NAMED.get(c) or _code(c)


def _code(c: str) -> str:
    n = ord(c)
    if 0xDC80 <= n <= 0xDCFF:   # a byte the OS gave that is not UTF-8: named as os_text does
        n -= 0xDC00
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _unwritable(exc: UnicodeError) -> tuple[str, int]:
    """The encoding error handler of stdout (guard_stdout): what its encoding cannot write,
    escaped as ``printable`` escapes it."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    return "".join(map(_code, exc.object[exc.start:exc.end])), exc.end


codecs.register_error("outpost.escape", _unwritable)


def _json_escape(match: re.Match[str]) -> str:
    c = match.group()
    if not _hidden(c):
        return c
    n = ord(c)
    if n < 0x10000:
        return f"\\u{n:04x}"
    n -= 0x10000   # JSON spells a character past the BMP as a surrogate pair
    return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"


def printable(text: str) -> str:
    """``text`` with each hidden character shown as an escape (``\\x1b``, ``\\n``,
    ``\\u202e``)."""
    return _SUSPECT.sub(_escape, text)


def printable_value(text: str) -> str:
    """An app's or upstream's value (an id, a type, a reason) as ``printable`` shows it, its
    backslashes doubled too, as repr doubles them: an id holding the six characters
    ``\\u202e`` is not shown as the one holding the character they name. Not for a
    message of the agent's own: what it quotes is a repr already, and a path's backslashes
    are Windows's separators."""
    return printable(text.replace("\\", "\\\\"))


def os_text(name: object) -> str:
    """``name`` (a path, a string from the environment) as text that any encoder takes
    (orjson, SQLite, a UTF-8 stream): the bytes in it that are not UTF-8 (a directory named
    in Latin-1), which Python keeps as lone surrogates, shown as ``\\xe9``."""
    text = str(name)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        # A surrogate no byte stands for (U+D800): as its escape. Never raised: an
        # upstream's last error passes here on the way to /status, a crash's included.
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def printable_lines(text: str) -> str:
    """``text`` as ``printable`` shows it, but for its ``\\n`` line breaks: kept."""
    return "\n".join(printable(line) for line in text.split("\n"))


def shell_arg(path: object) -> str:
    """``path`` as one argument of a command line the operator is told to run: a path with a
    space (macOS's /Library/Application Support) pasted unquoted names two files. One
    holding what ``printable`` escapes (a byte that is not UTF-8, a control or bidi
    character) is ``$'...'``, whose ``\\xe9`` the shell (bash, zsh, POSIX 2024 sh) takes
    for that byte: shown escaped in quotes, it named another file, pasted."""
    text = str(path)
    if sys.platform == "win32":
        # Imported here: every command imports this module, few print a command.
        import subprocess
        return subprocess.list2cmdline([text])
    if any(map(_hidden, text)):
        return "$'" + "".join(_in_dollar_quotes(c) for c in text) + "'"
    import shlex
    return shlex.quote(text)


def _in_dollar_quotes(c: str) -> str:
    if _hidden(c):
        return "".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogateescape"))
    return "\\" + c if c in "\\'" else c


def systemd_word(path: object, *, variables: bool = False) -> str:
    """``path`` as one word of a systemd unit setting: quoted if it holds a space or a quote
    (else it is split), % doubled (else taken for a specifier), and $ doubled where the
    setting expands ``$VARIABLES`` (ExecStart=), not where it does not (ReadWritePaths=)."""
    text = str(path).replace("%", "%%")
    if variables:
        text = text.replace("$", "$$")
    if any(c.isspace() or c in "\"'\\" for c in text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def printable_json(text: str) -> str:
    """JSON text with its hidden characters as ``\\uXXXX`` escapes: still the same JSON."""
    return _JSON_SUSPECT.sub(_json_escape, text)


class OutputError(OSError):
    """Standard output could not be written (a reader that left is BrokenPipeError)."""


class _Stdout(io.TextIOWrapper):
    def write(self, s: str) -> int:
        try:
            return super().write(s)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(exc.errno, exc.strerror) from exc

    def flush(self) -> None:
        try:
            super().flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(exc.errno, exc.strerror) from exc


def guard_stdout() -> None:
    """sys.stdout as an ``_Stdout`` over the same file, encoding and buffering. Left as it
    is when it is not the process's own (None when started with it closed, a test's
    capture). What its encoding cannot write is escaped as by ``printable`` (``\\xe9``): under
    a UTF-8 locale (en_US.UTF-8) Python's stdout refuses the lone surrogates that stand for
    a path's bytes of another encoding, and a command naming such a path ended in a
    traceback."""
    out = sys.stdout
    if type(out) is not io.TextIOWrapper:
        return
    out.flush()
    errors = "outpost.escape" if out.errors == "strict" else out.errors
    sys.stdout = _Stdout(out.detach(), encoding=out.encoding, errors=errors,
                         line_buffering=out.line_buffering, write_through=out.write_through)
