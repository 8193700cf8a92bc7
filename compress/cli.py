"""The ``compress`` command: argparse subcommands, each defined in ``compress/commands/<name>.py``.

Each command module has ``register(subparsers)``, which adds its parser and sets ``func`` to a function
taking the parsed args. Errors: UserError -> one line on stderr, exit 2; anything else -> exit 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import UserError

# Order is the order of `compress --help`.
COMMAND_MODULES = [
    "info",
    "data",
    "train",
    "val",
    "prune",
    "eagleeye",
    "slim",
    "qat",
    "export",
    "bench",
    "run",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    p = argparse.ArgumentParser(
        prog="compress",
        description="Make YOLOv5-family detectors smaller and faster: prune, quantize, export.",
    )
    p.add_argument("--version", action="version", version=f"compress {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"compress.commands.{name}").register(sub)
    return p


def main(argv=None) -> int:
    """Entry point of the ``compress`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"compress {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
