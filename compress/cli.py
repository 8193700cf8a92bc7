"""The ``compress`` command: argparse subcommands, each defined in ``compress/commands/<name>.py``.

Each command module has ``register(subparsers)``, which adds its parser and sets ``func`` to a function
taking the parsed args; stage commands build their flags from the stage's options (:mod:`compress.stages`).
Exit codes: UserError and argparse usage errors -> one line on stderr, 2; a failed result check
(CheckFailed) -> one line, 1; anything else -> 1 with its traceback (a bug to report).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import CheckFailed, UserError
from .options import OneLineParser

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
    p = OneLineParser(
        prog="compress",
        description="Make YOLOv5-family detectors smaller and faster: prune, quantize, export.",
    )
    p.add_argument("--version", action="version", version=f"compress {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"compress.commands.{name}").register(sub)
    return p


def main(argv=None) -> int:
    """Entry point of the ``compress`` console script; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    prog = _prog(args)
    if extra:  # name the subcommand, not the top-level parser
        print(f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see {prog} --help)", file=sys.stderr)
        return 2
    try:
        rc = args.func(args)
        sys.stdout.flush()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader went away (`compress data check | head`): leave quietly
        _silence_stdout()
        return 0
    return int(rc or 0)


def _prog(args) -> str:
    """``compress train``, ``compress data synth``: the command the user typed."""
    return " ".join(["compress", args.command] + ([args.action] if getattr(args, "action", None) else []))


def _silence_stdout() -> None:
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
