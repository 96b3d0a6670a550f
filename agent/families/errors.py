"""The one error the family rules raise: a message breaks its family's rules.

It says nothing about HTTP: each dialect renders it in its own API's shape and
status (see agent/dialects/replies.py ``status_of``).
"""

from __future__ import annotations


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
