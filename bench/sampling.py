"""A sampler thread for the bench's meters: ``sample()`` every ``interval`` s inside a block."""

from __future__ import annotations

import threading
from typing import Self


class Sampler:
    """Calls ``sample()`` every ``interval`` s on a daemon thread while a ``with`` block
    runs, and once more as it ends, so the last moment is never missed."""

    interval: float

    def sample(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
