"""Stages: per stage one options dataclass and one ``run(options) -> Report``; one registry for all callers.

The CLI subcommands (:mod:`compress.commands`) and the recipe runner (:mod:`compress.recipe`) both look a
stage up here, build its options (from flags or from a recipe mapping) and call its ``run``. Stage modules
import their heavy dependencies inside ``run``, so building every parser stays cheap.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..report import Report


@dataclass(frozen=True)
class StageSpec:
    """One stage: the command that runs it, where its options and ``run`` live, what it consumes and makes.

    ``produces_model``: its folder is a model artifact the next recipe stage starts from;
    ``needs_weights``: why it cannot start from a bare ``--cfg`` (None when it can);
    ``prunes``: its artifact is narrower than its input (its report's ``parent`` is the unpruned model).
    """

    name: str
    command: str
    module: str
    options_class: str
    produces_model: bool = False
    needs_weights: str | None = None
    prunes: bool = False

    @property
    def options(self) -> type:
        """The stage's options dataclass."""
        return getattr(importlib.import_module(self.module), self.options_class)

    def run(self, options) -> Report:
        """Run the stage (options are validated by the stage itself)."""
        return importlib.import_module(self.module).run(options)

    def preflight(self, options, model, info) -> None:
        """The stage's checks of its options against an input model and a dataset (``DataInfo``), the ones
        its ``run`` makes before writing anything; what ``compress run --check`` runs for every stage whose
        input architecture is known. Stages without such checks do nothing."""
        check = getattr(importlib.import_module(self.module), "preflight", None)
        if check is not None:
            check(options, model, info)


_TRAINED = "it starts from a trained model: put a train stage before it, or give the recipe model: {weights: ...}"
STAGES = {s.name: s for s in (
    StageSpec("train", "train", "compress.stages.train", "TrainStageOptions", produces_model=True),
    StageSpec("finetune", "train", "compress.stages.train", "TrainStageOptions", produces_model=True,
              needs_weights=_TRAINED),
    StageSpec("prune", "prune", "compress.stages.prune", "PruneOptions", produces_model=True, prunes=True),
    StageSpec("slim", "slim", "compress.stages.slim", "SlimOptions", produces_model=True, needs_weights=_TRAINED,
              prunes=True),
    StageSpec("eagleeye", "eagleeye", "compress.stages.eagleeye", "EagleEyeOptions", produces_model=True,
              prunes=True),
    StageSpec("qat", "qat", "compress.stages.qat", "QATOptions", produces_model=True, needs_weights=_TRAINED),
    StageSpec("export", "export", "compress.stages.export", "ExportOptions"),
    StageSpec("val", "val", "compress.stages.val", "ValOptions"),
    StageSpec("bench", "bench", "compress.stages.bench", "BenchOptions"),
)}


def stage_for_command(command: str) -> StageSpec:
    """The stage a CLI command runs (``train`` for ``compress train``)."""
    return next(s for s in STAGES.values() if s.command == command)
