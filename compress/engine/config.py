"""What the training loop is configured with: its options and the callback contract.

Kept apart from :mod:`compress.engine.trainer` (which imports the data pipeline, the loss and the
validator) so that building every command's parser stays light.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..options import DataInput, DeviceOptions, ModelInput, OutputOptions, option

OPTIMIZERS = ("SGD", "Adam", "AdamW")


@dataclass(kw_only=True)
class TrainOptions(ModelInput, DataInput, DeviceOptions, OutputOptions):
    """What the training loop takes; the command-line fields are ``compress train``'s flags (ultralytics names)."""

    epochs: int = option(100, "training epochs")
    batch: int = option(16, "batch size per process", flags=("--batch-size",))
    hyp: str | dict | None = option(None, "hyperparameter YAML (ultralytics hyp.scratch-low keys) or a shipped name "
                                          "(adamw-fast)", default_help="hyp.scratch-low")
    seed: int = option(0, "random seed (python, numpy, torch, augmentation)")
    cos_lr: bool = option(False, "cosine LR schedule (default linear)")
    sync_bn: bool = option(False, "SyncBatchNorm under torchrun (CUDA only)")
    optimizer: str = option("SGD", "optimizer (with Adam/AdamW use a smaller lr0, e.g. --hyp adamw-fast)",
                            choices=OPTIMIZERS)
    nbs: int = option(64, "nominal batch size: gradients are accumulated to it before each step (ultralytics 64)")
    patience: int = option(0, "stop after this many epochs without improvement (0: off)")
    val_interval: int = option(1, cli=False)
    max_val_images: int | None = option(None, cli=False)
    progress: bool = option(True, cli=False)
    extra: dict = option({}, cli=False)  # options of the callbacks, recorded in opt.yaml and the report

    def check(self):
        super().check()
        self.require_positive("epochs", "batch", "nbs", "val_interval")
        self.require_non_negative("patience")
        from ..data.dataset import load_hyp

        load_hyp(self.hyp)  # a bad hyp file is a user error before anything runs


class Callback:
    """Hooks into :class:`Trainer`; override the ones a stage needs. All receive the trainer.

    The contract: the trainer owns the loop and every file it writes. A callback may

    - train another model than the float one (:meth:`train_model`, e.g. QAT's fake-quantized twin),
      and turn the EMA off (``uses_ema = False``);
    - add a loss term on each batch (:meth:`loss`, e.g. distillation) and train modules of its own
      alongside the model (:meth:`aux_modules`, e.g. distillation adapters);
    - add a gradient term (:meth:`on_before_step`), log per epoch (:meth:`on_epoch_end`) and extend the
      final report (:meth:`on_train_end`);
    - decide what an artifact holds (:meth:`artifact`): its weights and extra tensor files.
    """

    uses_ema = True

    def options(self) -> dict:
        """What ``TrainOptions.extra`` records of this callback (opt.yaml, the report's options), from which
        ``--resume`` rebuilds it; ``{}`` for a callback with no options of its own."""
        return {}

    def on_prepare(self, trainer):
        """After the model is built and moved to its device, before the optimizer exists."""

    def train_model(self, trainer, model):
        """The model to train instead of ``model`` (default: ``model`` itself)."""
        return model

    def aux_modules(self, trainer) -> dict:
        """``{name: module}`` trained alongside the model (after :meth:`train_model`): they join the optimizer,
        the gradient clipping, DDP's gradient averaging and the train state (``--resume`` restores them), but
        never an artifact. Run them through ``trainer.aux_run[name]`` (the DDP-wrapped one under torchrun)."""
        return {}

    def on_train_start(self, trainer):
        """After the optimizer, loaders and EMA exist."""

    def loss(self, trainer, imgs, preds):
        """An extra loss term on this batch: ``(term, {name: value})`` or None. ``imgs`` is the batch the model
        saw (0..1), ``preds`` its train-mode output; ``term`` is scaled like the detection loss (x batch
        size); each named value is averaged over the epoch into results.csv and shown in the progress bar."""
        return None

    def on_before_step(self, trainer):
        """After backward (gradients unscaled and clipped) and before each optimizer step."""

    def on_epoch_end(self, trainer, record: dict):
        """After validation; ``record`` is the results.csv row (add keys to log more)."""

    def artifact(self, trainer) -> tuple:
        """``(state_dict or None, {file name: tensors})`` an artifact holds: None keeps the float weights."""
        return None, {}

    def on_save(self, trainer, out_dir: Path):
        """After an artifact is written (``out_dir`` is the run folder or ``last/``)."""

    def on_train_end(self, trainer, report: dict):
        """After training; ``report`` is the final report.json content (may be extended)."""


def callback_options(callbacks) -> dict:
    """The options of all ``callbacks`` (:meth:`Callback.options`) in one mapping, for ``TrainOptions.extra``."""
    return {k: v for cb in callbacks for k, v in cb.options().items()}
