"""Terms the agent's local endpoints (dead.py, tail.py) and the commands that call them
(dead_cli.py, cli_tail.py) share: here, so that a command need not import the endpoints,
and aiohttp and the spool with them, to know them."""

# Entries GET /dead lists at most, oldest first (the summary counts all of them).
LIST_LIMIT = 10_000
EXPORT_PAGE = 1000  # dead letters read at a time for GET /dead/export
# A viewer whose stream has waited this long (by CLOCK) for it to read is closed: its
# client is suspended (Ctrl-Z), its output paused (a pager, Ctrl-S), or it never reads.
# A slow reader still reads: its writes complete, and it loses only the overflow. An
# export whose reader has taken nothing for this long is cut the same way.
STALL_S = 30.0
CHECK_S = 1.0   # how soon a reader that left, or stalled (STALL_S), is noticed
