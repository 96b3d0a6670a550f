"""Endpoints for the agent's own page and local tools only (dead letters, the live view,
/flush).

Stricter than the guard every route sits behind: a page on one of
``listen.allowed_origins`` (an app sending events) may not use them either.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web


def foreign(request: web.Request, what: str) -> str | None:
    """Why ``request`` may not use ``what``; None for a local tool (no Origin, no
    Sec-Fetch-Site) or the agent's own page (its Origin is the Host it asked)."""
    origin = request.headers.get("Origin")
    host = request.headers.get("Host")
    if origin is not None and (host is None or urlsplit(origin.lower()).netloc != host.lower()):
        return f"Origin {origin!r} may not use {what}: only the agent's own page may"
    site = request.headers.get("Sec-Fetch-Site")
    if site not in (None, "same-origin", "none"):
        return f"a {site} browser request may not use {what}"
    return None
