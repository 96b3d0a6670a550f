"""The durable queue: SQLite in WAL mode, group commit, FIFO per key (see store.py)."""

from agent.spool.store import Spool
from agent.spool.types import RETRY_AFTER_FULL_S, Reason, Row, SpoolFull, Stream

__all__ = ["RETRY_AFTER_FULL_S", "Reason", "Row", "Spool", "SpoolFull", "Stream"]
