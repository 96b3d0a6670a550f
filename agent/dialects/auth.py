"""Write keys carried in HTTP Basic auth, as Segment-like APIs carry them."""

from __future__ import annotations

import base64
import binascii


def basic_user(header: str | None) -> str | None:
    """The username of a Basic Authorization header, with or without the trailing colon."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    token = token.strip()
    try:
        decoded = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
        return decoded.decode("utf-8").partition(":")[0] or None
    except (binascii.Error, ValueError):
        return None


def basic(key: str) -> str:
    """A Basic Authorization header naming ``key`` (for examples and clients)."""
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()
