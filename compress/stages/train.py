"""The ``train`` stage (and ``finetune`` in recipes): train from a YAML, fine-tune an artifact, resume a run.

Nothing is written until the options, the dataset and the model are checked. ``--sparsity S`` adds
Network Slimming's L1 term (:class:`~compress.stages.sparsity.SparsityCallback`). ``--resume`` continues a
run from its ``last/`` checkpoint with the options its ``opt.yaml`` recorded; options given again are
applied where that is safe (``--device``, ``--workers``) and refused otherwise, never silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine.config import TrainOptions, callback_options
from ..errors import UserError
from ..fileio import new_run_dir, unfinished_run
from ..log import note
from ..options import flag_name, option
from ..prune.slim import SCHEDULES
from .base import DataInfo, Report, load_input_model, output_dir
from .distill import DistillCallback, DistillOptions
from .distill import preflight as distill_preflight

SPARSITY = "sparsity training (Network Slimming; then `compress slim`)"
# Options --resume may change: they affect where and how fast the run goes, not what it computes.
RESUME_SAFE = ("device", "workers")
# Flags that TrainOptions.extra (opt.yaml) records under another name; the other callback flags (sparsity,
# distillation) keep theirs.
_EXTRA_KEYS = {"exclude": "sparsity_exclude"}


@dataclass(kw_only=True)
class TrainStageOptions(DistillOptions, TrainOptions):
    """What ``compress train`` takes: the training loop's flags, sparsity training, distillation and
    ``--resume``."""

    sparsity: float | None = option(None, "add S * sign(gamma) to the gradient of every prunable BatchNorm gamma "
                                          "(L1 penalty), e.g. 1e-3; logs the share of gammas below 1e-2/1e-3 and "
                                          "gamma_hist.png each epoch", metavar="S", group=SPARSITY)
    sparsity_schedule: str | None = option(None, "constant (default) or cosine-decay (S in the first epoch after "
                                                 "warmup down to 0.01*S in the last)", choices=SCHEDULES,
                                           group=SPARSITY)
    sparsity_warmup_epochs: int | None = option(None, "no L1 term in the first K epochs (default 0)", metavar="K",
                                                group=SPARSITY)
    exclude: list = option([], "with --sparsity: layers or groups whose gammas get no L1 term (as `compress slim "
                               "--exclude`; give the same to both)", metavar="LAYER", group=SPARSITY)
    resume: bool | str = option(False, "resume the run in --out (or the given run folder) from its last checkpoint",
                                nargs="?", const=True, metavar="DIR", recipe=False)

    def check(self):
        super().check()
        self.sparsity_callbacks()
        if self.sparsity is not None and (self.sparsity_warmup_epochs or 0) >= self.epochs:
            raise UserError(f"--sparsity-warmup-epochs {self.sparsity_warmup_epochs} with --epochs {self.epochs}: the "
                            f"L1 term would never be applied")

    def sparsity_callbacks(self) -> list:
        """``[SparsityCallback]`` for ``--sparsity`` (checked), ``[]`` without it."""
        from .sparsity import SparsityCallback

        if self.sparsity is None:
            for name in ("sparsity_schedule", "sparsity_warmup_epochs", "exclude"):
                if getattr(self, name):
                    raise UserError(f"{flag_name(name)} only applies to sparsity training: add --sparsity S "
                                    f"(e.g. 1e-3)")
            return []
        return [SparsityCallback(self.sparsity, self.sparsity_schedule or "constant",
                                 self.sparsity_warmup_epochs or 0, self.exclude)]


def callbacks_from_extra(extra: dict) -> list:
    """Callbacks recorded in ``TrainOptions.extra`` (opt.yaml), so ``--resume`` restores them."""
    from .sparsity import SparsityCallback

    return [cb for cb in (SparsityCallback.from_options(extra or {}), DistillCallback.from_options(extra or {}))
            if cb]


def preflight(o: TrainStageOptions, model, info: DataInfo) -> None:
    """Checks of the options against the model and the dataset, before anything is written."""
    if o.weights:
        info.check_model(model)
    if o.sparsity is not None:
        from ..prune import channel_groups

        channel_groups(model).exclude(o.exclude)
    distill_preflight(o, model)


def run(o: TrainStageOptions) -> Report:
    """Train, fine-tune or resume; returns the report of the best epoch's artifact."""
    from ..data.dataset import YoloDataset, load_data_yaml
    from ..engine.device import dist_rank
    from ..engine.trainer import save_options, train

    if o.resume:
        return _resume(o)
    o.validate()
    if not o.data:
        raise UserError("--data DATA.yaml is required")
    callbacks = o.sparsity_callbacks() + o.distill_callbacks()
    data = load_data_yaml(o.data)
    model = load_input_model(o, data, seed=o.seed)
    preflight(o, model, DataInfo.of(data))
    for split in ("train", "val"):  # unreadable images or labels are found before anything is written
        YoloDataset(data[split], o.resolved_imgsz(), nc=data["nc"], prefix=f"{split}: ", verbose=False)
    main = dist_rank() == 0
    out = output_dir(o, "train") if main else Path(o.out or new_run_dir("train", o.name))
    o = o.replace(out=str(out), imgsz=o.resolved_imgsz(),
                  extra=callback_options(callbacks))
    with unfinished_run(out, "train", enabled=main):
        if main:
            save_options(o)
        return Report.from_dict(train(o, callbacks, model=model, data=data))


def _resume(o: TrainStageOptions) -> Report:
    from ..engine.trainer import load_options, resume

    if isinstance(o.resume, str):
        run_dir = Path(o.resume)
    elif o.out:
        run_dir = Path(o.out)
    else:
        raise UserError("--resume needs the run folder (--resume DIR or --out DIR)")
    saved = load_options(run_dir)
    last = Report.read(run_dir / "last")
    if last is not None and isinstance(last.details.get("epoch"), int) and last.details["epoch"] >= saved.epochs:
        raise UserError(f"{run_dir}: training already finished ({saved.epochs} epochs); nothing to resume (start a "
                        f"new run with --weights {run_dir} to train on)")
    changes, notes = {}, []
    for name in sorted(o.given - {"resume", "out", "name"}):
        new = getattr(o, name)
        # a flag TrainOptions lacks belongs to a callback: its recorded value is in extra
        old = getattr(saved, name) if hasattr(saved, name) else saved.extra.get(_EXTRA_KEYS.get(name, name))
        if _same(name, new, old):
            continue
        if name in RESUME_SAFE:
            changes[name] = new
            notes.append(f"--resume: {flag_name(name)} {new} replaces the recorded {old}")
            continue
        raise UserError(f"--resume continues {run_dir} with the options its opt.yaml recorded; {flag_name(name)} "
                        f"{new} differs from the recorded {old}: drop it, or start a new run")
    opts = saved.replace(**changes) if changes else saved
    opts.validate()
    for line in notes:
        note(line)
    with unfinished_run(run_dir, "train"):
        return Report.from_dict(resume(run_dir, callbacks_from_extra(opts.extra), opts=opts))


def _same(name, new, old) -> bool:
    if name in ("data", "weights", "cfg", "hyp", "teacher") and isinstance(new, str) and isinstance(old, str):
        return Path(new).absolute() == Path(old).absolute() or new == old
    if name == "exclude":
        return list(new or []) == list(old or [])
    return new == old
