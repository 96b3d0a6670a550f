"""``python -m agent`` and the ``outpost`` command.

``outpost run`` re-executes itself with the C allocator (agent/server/allocator.py) here, before
the agent's modules are imported: imported first, they were paid for twice, about 0.45 s of
a 1.5 s startup."""

import sys

from agent.server import allocator


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        allocator.use_c_allocator()
    from agent.cli import main as cli_main
    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
