"""Write keys carried in HTTP Basic auth, as Segment-like APIs carry them."""

from __future__ import annotations

import base64
import binascii

# Headers already decoded: an app sends the same one with every request (base64 and
# UTF-8 decoding each time was ~1.5 µs of a single-event request). Bounded: emptied
# when full, so odd headers cannot grow it.
_USERS: dict[str, str] = {}
_USERS_MAX = 256
OWS = " \t"   # HTTP's whitespace; str.strip() would also take NBSP, NEL or U+3000


class BadAuth(ValueError):
    """An Authorization header that is there but names no write key. Refused (401), never
    taken as no key at all: stored under `anonymous`, its events could never be sent."""


def basic_user(header: str | None) -> str | None:
    """The username of a Basic Authorization header, with or without the trailing colon;
    None without one (absent or empty). Raises BadAuth for any other header."""
    if not header:
        return None
    try:
        return _USERS[header]
    except KeyError:
        pass
    user = _decode(header)
    if len(_USERS) >= _USERS_MAX:
        _USERS.clear()
    _USERS[header] = user
    return user


def _decode(header: str) -> str:
    scheme, _, token = header.strip(OWS).partition(" ")
    if scheme.lower() != "basic":
        raise BadAuth("the Authorization header must be Basic auth with the write key")
    token = token.strip(OWS)
    try:
        decoded = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
        user = decoded.decode("utf-8").partition(":")[0]
    except (binascii.Error, ValueError):
        raise BadAuth("the Authorization header's credentials are not base64 of UTF-8 "
                      "text") from None
    if not user:
        raise BadAuth("the Authorization header names no write key")
    return user


def basic(key: str) -> str:
    """A Basic Authorization header naming ``key`` (for examples and clients)."""
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()
