"""The ``rmserve`` command line: ``train``, ``eval``, ``export``, ``serve``.

Each subcommand is registered by a small module that declares its flags and imports its heavy
dependencies (torch, onnxruntime) only when it runs, so ``rmserve --help`` is instant and
works with any subset of the extras installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from rmserve import __version__

__all__ = ["build_parser", "main"]

# Modules that define ``register(subparsers)``; each adds its subcommands.
COMMAND_MODULES = ("rmserve.training.commands", "rmserve.service.commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmserve",
        description=(
            "Train Bradley-Terry reward models on preference pairs, export them to ONNX "
            "bundles, and serve rewards over HTTP to RL loops (PPO, GRPO, best-of-n)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rmserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        # An extra that is not installed (say pydantic-settings without `serve`) leaves its
        # commands out instead of breaking the others; a module of rmserve missing is a bug.
        try:
            importlib.import_module(module_name).register(subparsers)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("rmserve"):
                raise
            continue
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
