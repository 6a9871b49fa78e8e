"""pyflowctl entry point (see pyflow.daemon: the daemon it talks to is not in this release)."""

from __future__ import annotations

import sys

from .daemon import not_yet_available


def main(argv: list[str] | None = None) -> int:
    return not_yet_available("pyflowctl", "pyflow flow-offload control", argv)


if __name__ == "__main__":
    sys.exit(main())
