"""``python -m agent`` and the ``outpost`` command.

``outpost run`` re-executes itself with the C allocator (agent/server/allocator.py) here, before
the agent's modules are imported: imported first, they were paid for twice, about 0.45 s of
a 1.5 s startup."""

import sys

from agent import startup_signals

INTERRUPTED = 130   # 128 + SIGINT, as shells report it


def main() -> int:
    run = sys.argv[1:2] == ["run"]
    startup_signals.defer(reloads=run)   # until the modules are loaded: see startup_signals
    try:
        from agent.server import allocator
        if run:
            startup_signals.hold_for_exec()   # the new image's first moments: see there
            allocator.use_c_allocator()   # returns when it has not re-executed
            startup_signals.defer(reloads=True)   # what was held comes now
        from agent.cli import main as cli_main
        # `run` loads more before its own handlers exist, and takes the interrupt then.
        if not run and startup_signals.taken():
            raise KeyboardInterrupt
        return cli_main()
    except KeyboardInterrupt:
        # Ctrl-C before `run` has its own handlers, or during any other command: nothing
        # was started that needs stopping.
        print("outpost: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
