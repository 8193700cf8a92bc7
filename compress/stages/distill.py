"""Knowledge distillation while training (``--teacher``), as a trainer callback.

``compress train --weights PRUNED --teacher parent`` (and ``compress qat``, and ``teacher: parent`` in a
recipe stage) fine-tunes the student with the model it was pruned from as teacher: the teacher runs in
eval mode, without gradients, on the same augmented batch; the losses are :mod:`compress.engine.distill`'s
(objectness-weighted output distillation, channel-wise distillation of the maps feeding Detect through
1x1 adapters). The adapters are trained with the student and kept in the train state (``--resume``
restores them), never in the artifact: what a run writes stays a plain YOLOv5 model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine.config import Callback
from ..errors import UserError
from ..options import Options, flag_name, option
from ..report import Report
from . import STAGES

DISTILL = "knowledge distillation (--teacher)"
PARENT = "parent"
_ADAPTERS = "distill_adapters"
MODES = ("output", "both", "feature")
# Defaults measured in benchmarks/distill.py (yolov5n, EagleEye 0.6): the output terms at weight 3 kept the
# most mAP; adding the feature term lowered it at every weight tried.
DEFAULT_MODE, DEFAULT_WEIGHT = "output", 3.0


@dataclass(kw_only=True)
class DistillOptions(Options):
    """The distillation flags of every training stage (``compress train``, ``compress qat``, recipes)."""

    teacher: str | None = option(None, "distill from this model while training: an artifact, its weights.pt, an "
                                       "ultralytics .pt, or `parent` (the model --weights was pruned from, found "
                                       "through the report.json of each stage)", metavar="MODEL", group=DISTILL)
    distill: str | None = option(None, "what the student learns from the teacher: its Detect outputs "
                                       "(objectness-weighted), the feature maps feeding Detect (channel-wise), or "
                                       "both", choices=MODES, default_help=DEFAULT_MODE, group=DISTILL)
    distill_weight: float | None = option(None, "weight of the distillation terms (1: the teacher weighs like "
                                                "the labels)", metavar="W", default_help=str(DEFAULT_WEIGHT),
                                          group=DISTILL)
    distill_temperature: float | None = option(None, "temperature of the channel-wise softmax", metavar="T",
                                               default_help="1.0", group=DISTILL)

    def check(self):
        super().check()
        if self.teacher is None:
            for name in ("distill", "distill_weight", "distill_temperature"):
                if getattr(self, name) is not None:
                    raise UserError(f"{flag_name(name)} only applies to distillation: add --teacher MODEL "
                                    f"(or --teacher parent)")
            return
        if self.teacher != PARENT:
            resolve_teacher(self.teacher, self.weights)  # a missing path is an error before anything runs
        if self.distill_weight is not None:
            self.require_range("distill_weight", 0, 1e3, lo_open=True)
        if self.distill_temperature is not None:
            self.require_range("distill_temperature", 0, 100, lo_open=True)

    def distill_callbacks(self) -> list:
        """``[DistillCallback]`` for ``--teacher`` (resolved against ``--weights``), ``[]`` without it."""
        if self.teacher is None:
            return []
        return [DistillCallback(resolve_teacher(self.teacher, self.weights), self.distill or DEFAULT_MODE,
                                DEFAULT_WEIGHT if self.distill_weight is None else self.distill_weight,
                                1.0 if self.distill_temperature is None else self.distill_temperature)]


def pruned_from(weights) -> Path:
    """The model an artifact was pruned from: its report.json lineage (each stage names its parent) up to the
    nearest prune/slim/eagleeye stage, whose parent is the answer. UserError when the lineage has none."""
    if not weights:
        raise UserError("--teacher parent: needs --weights (the pruned model to fine-tune)")
    path, chain = Path(weights), []
    for _ in range(64):
        folder = path if path.is_dir() else path.parent
        rep = Report.read(folder)
        if rep is None:
            raise UserError(f"--teacher parent: {folder} has no report.json, so what {weights} was pruned from is "
                            f"unknown; give --teacher MODEL")
        chain.append(f"{rep.stage} ({folder})")
        if not rep.parent:
            raise UserError(f"--teacher parent: {weights} was not pruned (its lineage: {' <- '.join(chain)}); give "
                            f"--teacher MODEL")
        parent = Path(rep.parent)
        if not parent.exists():
            raise UserError(f"--teacher parent: {folder} names its parent {rep.parent}, which does not exist (moved "
                            f"or deleted?); give --teacher MODEL")
        if rep.stage in STAGES and STAGES[rep.stage].prunes:
            return parent.absolute()
        path = parent
    raise UserError(f"--teacher parent: the lineage of {weights} is longer than 64 stages (a loop?)")


def resolve_teacher(teacher: str, weights) -> Path:
    """``--teacher`` as an absolute path: ``parent`` through :func:`pruned_from`, else the path given."""
    if teacher == PARENT:
        return pruned_from(weights)
    p = Path(teacher)
    if not p.exists():
        raise UserError(f"--teacher {teacher}: no such artifact directory or weights file")
    return p.absolute()


def load_teacher(path, student, imgsz: int, outputs: bool = True):
    """Load the teacher at ``path`` (restricted reader) in eval mode without gradients, checked against the
    ``student``: the same Detect levels and strides, and for output distillation (``outputs``) the same
    classes and anchors; ``imgsz`` must suit its strides."""
    import torch

    from ..model.artifact import load_model
    from ..model.profile import check_imgsz
    from ..model.yolo import detect_head

    where = f"--teacher {path}"
    try:
        teacher = load_model(None, path)
        check_imgsz(teacher, imgsz)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    s, t = detect_head(student), detect_head(teacher)
    if s.nl != t.nl or not torch.equal(s.stride.cpu(), t.stride.cpu()):
        raise UserError(f"{where}: Detect levels at strides {t.stride.int().tolist()}, the student's at "
                        f"{s.stride.int().tolist()}: distillation needs the same levels")
    if outputs and (s.nc != t.nc or s.anchors.shape != t.anchors.shape
                    or not torch.allclose(s.anchors.cpu(), t.anchors.cpu())):
        raise UserError(f"{where}: {t.nc} classes and {t.anchors.shape[1]} anchors per level (or other anchor "
                        f"sizes) against the student's {s.nc} and {s.anchors.shape[1]}; output distillation needs "
                        f"the same classes and anchors (use --distill feature)")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def preflight(o: DistillOptions, model) -> None:
    """Check ``--teacher`` against the student ``model`` before anything is written. ``parent`` is resolved
    when ``--weights`` exists already (in a recipe it is the output of an earlier stage: checked when it runs)."""
    if o.teacher == PARENT and not (o.weights and Path(o.weights).exists()):
        return
    for cb in o.distill_callbacks():
        cb.load_teacher(model, o.resolved_imgsz())


class _Inputs:
    """Catches what one Detect module receives (the per-level feature maps), leaving copies of the module
    (the EMA, a deep copy) alone."""

    def __init__(self, module):
        self.module, self.feats = module, None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if module is self.module:
            self.feats = list(args[0])

    def take(self) -> list:
        feats, self.feats = self.feats, None
        if feats is None:
            raise RuntimeError("distillation: the Detect head did not run in this forward pass")
        return feats


class DistillCallback(Callback):
    """Adds the distillation terms to each batch's loss (see the module docstring).

    ``teacher``: an artifact or weights path (loaded with the restricted reader); ``mode``: ``both``,
    ``output`` or ``feature``; ``weight`` scales both terms; ``tau`` the channel-wise temperature. Output
    distillation needs the teacher's classes, levels, strides and anchors; feature distillation its strides.
    Logs ``distill_obj``/``distill_cls``/``distill_box`` and ``distill_feat`` per epoch (results.csv).
    """

    def __init__(self, teacher, mode: str = DEFAULT_MODE, weight: float = DEFAULT_WEIGHT, tau: float = 1.0):
        if mode not in MODES:
            raise UserError(f"--distill {mode}: choose one of {', '.join(MODES)}")
        self.teacher_path, self.mode, self.weight, self.tau = str(teacher), mode, float(weight), float(tau)
        self.teacher = self.student_in = self.teacher_in = None

    def options(self) -> dict:
        """The options as recorded in ``TrainOptions.extra`` (what ``--resume`` rebuilds this from)."""
        return {"teacher": self.teacher_path, "distill": self.mode, "distill_weight": self.weight,
                "distill_temperature": self.tau}

    @classmethod
    def from_options(cls, extra: dict):
        """The callback recorded in ``extra`` (see :meth:`options`), or None when it names no teacher."""
        if not extra or not extra.get("teacher"):
            return None
        return cls(extra["teacher"], extra.get("distill", DEFAULT_MODE), extra.get("distill_weight", DEFAULT_WEIGHT),
                   extra.get("distill_temperature", 1.0))

    @property
    def outputs(self) -> bool:
        return self.mode in ("both", "output")

    @property
    def features(self) -> bool:
        return self.mode in ("both", "feature")

    def load_teacher(self, student, imgsz: int):
        """The teacher model, checked against ``student`` (a float model) at ``imgsz``; UserError naming it."""
        return load_teacher(self.teacher_path, student, imgsz, self.outputs)

    def on_prepare(self, trainer):
        self.teacher = self.load_teacher(trainer.float_model, trainer.opts.imgsz).to(trainer.device)
        if trainer.main:
            print(f"distilling from {self.teacher_path} ({self.mode}, weight {self.weight:g}"
                  + (f", temperature {self.tau:g}" if self.features else "") + ")")

    def aux_modules(self, trainer):
        from ..engine.distill import FeatureAdapters
        from ..model.yolo import detect_head

        if not self.features:
            return {}
        widths = [[m.in_channels for m in detect_head(x).m] for x in (trainer.model, self.teacher)]
        return {_ADAPTERS: FeatureAdapters(*widths)}

    def on_train_start(self, trainer):
        from ..model.yolo import detect_head

        self.student_in = _Inputs(detect_head(trainer.model))
        self.teacher_in = _Inputs(detect_head(self.teacher))

    def loss(self, trainer, imgs, preds):
        import torch

        from ..engine.distill import FEATURE_GAIN, cwd_loss, output_distill_loss

        with torch.no_grad():
            t_raw = self.teacher(imgs)[1]
        t_feats, s_feats = self.teacher_in.take(), self.student_in.take()
        total, items = torch.zeros((), device=imgs.device), {}
        if self.outputs:
            loss_fn = trainer.loss_fn
            gains = {k: loss_fn.hyp[k] for k in ("obj", "cls", "box")}
            obj, cls, box = output_distill_loss(preds, t_raw, loss_fn.det.anchors, gains, loss_fn.balance)
            total = total + obj + cls + box
            items.update(distill_obj=float(obj.detach()), distill_cls=float(cls.detach()),
                         distill_box=float(box.detach()))
        if self.features:
            adapted = trainer.aux_run[_ADAPTERS](s_feats)
            feat = sum(cwd_loss(s, t, self.tau) for s, t in zip(adapted, t_feats)) * FEATURE_GAIN
            total = total + feat
            items["distill_feat"] = float(feat.detach())
        return total * self.weight * imgs.shape[0], items

    def on_train_end(self, trainer, report):
        for caught in (self.student_in, self.teacher_in):
            caught.handle.remove()
        last = trainer.history[-1] if trainer.history else {}
        report["distill"] = {**self.options(), "last_epoch": {k: v for k, v in last.items()
                                                              if k.startswith("distill_")}}
