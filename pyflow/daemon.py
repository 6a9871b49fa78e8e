"""pyflowd entry point.

The long-running daemon (control socket, conntrack feed, metrics) is not in this
release yet; until it is, ``pyflowd`` and ``pyflowctl`` say so plainly instead of
pretending to run.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def not_yet_available(prog: str, what: str, argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=what)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    parser.parse_args(argv)
    print(f"{prog}: the pyflowd daemon is not available in this release; "
          "the datapath can be driven from Python through pyflow.loader", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    return not_yet_available("pyflowd", "pyflow flow-offload daemon", argv)


if __name__ == "__main__":
    sys.exit(main())
