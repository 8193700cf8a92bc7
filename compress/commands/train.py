"""``compress train``: train from a YAML, fine-tune an artifact, or resume an interrupted run."""
from __future__ import annotations

from .common import add_stage_command


def register(sub):
    """Add the ``train`` subcommand (the train stage's options)."""
    add_stage_command(sub, "train", "train or fine-tune a detector (one loop for every stage)",
                      "Train from --cfg, fine-tune --weights (any artifact, e.g. a pruned one), or --resume an "
                      "interrupted run. Nothing is written until the options, the dataset and the model are "
                      "checked.")
