"""CLI subcommands: each module registers one parser (see compress/cli.py)."""
