"""What an ``Origin`` header names, for the same-origin checks of the ingest guard and the
operator endpoints alike."""

from __future__ import annotations

from urllib.parse import urlsplit

from yarl import URL

# The schemes whose host a browser writes in its ASCII form (the URL Standard's special
# ones a page is served from); another scheme's host (`app://`) is opaque, sent as written.
_NAMED_HOSTS = ("http://", "https://")


def netloc(origin: str) -> str | None:
    """'http://LocalHost:8765' -> 'localhost:8765'; None for what is no URL: a local
    program may send any Origin (`http://[::1`, which urlsplit raises on)."""
    try:
        return urlsplit(origin.lower()).netloc
    except ValueError:
        return None


def as_sent(entry: str) -> str:
    """A `listen.allowed_origins` entry as a browser sends that Origin, lower-cased and
    without a trailing slash: 'https://Bücher.example/' -> 'https://xn--bcher-kva.example'.
    The address bar shows a site's name in Unicode, but its pages' Origin and Referer carry
    the name's ASCII form (IDNA, UTS 46 as browsers apply it: yarl's, `ß` kept)."""
    entry = entry.rstrip("/")
    if entry.isascii() or not entry.lower().startswith(_NAMED_HOSTS):
        return entry.lower()
    scheme, _, rest = entry.partition("://")
    host, colon, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    try:
        ascii_host = URL.build(scheme="http", host=host).raw_host or host
    except ValueError:   # UnicodeError: a label no browser can open (over 63 characters)
        return entry.lower()
    return f"{scheme}://{ascii_host}{colon}{port}".lower()
