"""What every subcommand module shares: a parser generated from its stage's options, and running it."""
from __future__ import annotations

from ..options import add_arguments
from ..stages import stage_for_command


def add_stage_command(sub, command: str, help: str, description: str):
    """Add the subcommand ``command``: its flags are its stage's option fields; running it runs the stage."""
    spec = stage_for_command(command)
    p = sub.add_parser(command, help=help, description=description)
    add_arguments(p, spec.options)

    def run(args) -> int:
        spec.run(spec.options.from_args(args))
        return 0

    p.set_defaults(func=run)
    return p
