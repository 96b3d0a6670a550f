"""What an ``Origin`` header names, for the same-origin checks of the ingest guard and the
operator endpoints alike."""

from __future__ import annotations

from urllib.parse import urlsplit


def netloc(origin: str) -> str | None:
    """'http://LocalHost:8765' -> 'localhost:8765'; None for what is no URL: a local
    program may send any Origin (`http://[::1`, which urlsplit raises on)."""
    try:
        return urlsplit(origin.lower()).netloc
    except ValueError:
        return None
