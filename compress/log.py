"""Messages for the user that are not results: warnings and notes go to stderr, folded to the terminal."""
from __future__ import annotations

import shutil
import sys
import textwrap


def warn(message: str, prefix: str = "warning: ") -> None:
    """Print a warning on stderr, folded at the terminal width (continuation lines indented)."""
    width = max(60, min(shutil.get_terminal_size((100, 20)).columns, 120))
    text = textwrap.fill(f"{prefix}{message}", width=width, subsequent_indent="  ", break_on_hyphens=False,
                         break_long_words=False)
    print(text, file=sys.stderr, flush=True)


def note(message: str) -> None:
    """Print a note (something the user should know, not an error) on stderr."""
    warn(message, prefix="note: ")
