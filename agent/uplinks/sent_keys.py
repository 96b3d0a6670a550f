"""Keys a protocol cannot carry as they are, one rule per protocol (registry.UPLINKS): what
ingest refuses of an app's key (UplinkBase.key_rule) and config validation of an upstream's
own `key`. Plain functions, so that validation imports no uplink class (nor aiohttp)."""

from __future__ import annotations

from collections.abc import Callable

# Why a key would reach another path or account, said after "(upstream) is sent the key"; or None.
KeyProblem = Callable[[str], str | None]


def any_key(key: str) -> str | None:
    """A protocol that sends any key as it is, or none."""
    return None


def path_segment(key: str) -> str | None:
    """Nucleus: the key is one escaped path segment of the URL (track_url); no escaping
    keeps `.` or `..`, which the URL resolves (`/app/../track` is `/track`)."""
    if key in (".", ".."):
        return f"as a path segment of its URL, which resolves {key!r} to another path"
    return None


def basic_username(key: str) -> str | None:
    """segment-http: the key is the Basic auth username, which ends at the first colon
    (RFC 7617): sent, 'ab:cd' would reach the upstream as the key 'ab'."""
    return "as a Basic auth username, which cannot hold ':'" if ":" in key else None
