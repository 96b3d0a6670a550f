"""The one error the family rules raise: a message breaks its family's rules.

It says nothing about HTTP: each dialect renders it in its own API's shape and
status (see agent/dialects/replies.py ``status_of``).
"""

from __future__ import annotations

import json
from typing import Any

import orjson


class Invalid(Exception):
    """A message (or a request's envelope) breaks its family's rules: the client's mistake.

    ``too_large``: it broke a size limit rather than a rule of shape (HTTP dialects answer
    413 for it, 400 otherwise). ``details`` is what the parser said, when there is more.
    """

    def __init__(self, message: str, details: str = "", *, too_large: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.too_large = too_large

    def within(self, where: str) -> Invalid:
        """The same error, naming the message of a batch it is about (``batch[3]: ...``)."""
        return Invalid(f"{where}: {self.message}", self.details, too_large=self.too_large)


def shown(value: Any) -> str:
    """``value`` as JSON, cut at 40 characters, for an error naming it. Never raises: what
    orjson does not write, a lone surrogate (``"id-\\ud83d"``) or nesting past its 255
    levels (it reads 1024), the json module writes, escaped; a value nested past what that
    writes too is named by its kind, where writing it took the request to a 500."""
    try:
        text = orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        try:
            text = json.dumps(value)
        except RecursionError:
            text = f"{'an object' if isinstance(value, dict) else 'an array'} nested too deeply"
    return text[:40] + "..." if len(text) > 40 else text
