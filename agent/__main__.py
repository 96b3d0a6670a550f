"""``python -m agent`` and the ``outpost`` command.

``outpost run`` re-executes itself with the C allocator (agent/server/allocator.py) here, before
the agent's modules are imported: imported first, they were paid for twice, about 0.45 s of
a 1.5 s startup."""

import sys

INTERRUPTED = 130   # 128 + SIGINT, as shells report it


def main() -> int:
    try:
        from agent.server import allocator
        if sys.argv[1:2] == ["run"]:
            allocator.use_c_allocator()
        from agent.cli import main as cli_main
        return cli_main()
    except KeyboardInterrupt:
        # Ctrl-C before `run` has its own handlers (while its modules load), or during
        # any other command: nothing was started that needs stopping.
        print("outpost: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
