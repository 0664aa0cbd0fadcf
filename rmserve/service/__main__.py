"""``python -m rmserve.service serve BUNDLE``: the serve command without the rest of the CLI
(for a serving image that has only the ``serve`` extra's code paths in use)."""

from __future__ import annotations

import argparse
import sys

from rmserve.service.commands import register


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m rmserve.service")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
