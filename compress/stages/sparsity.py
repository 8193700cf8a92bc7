"""Sparsity training for Network Slimming: the L1 term on prunable BatchNorm gammas, as a trainer callback.

``compress train --sparsity S`` is the train stage with :class:`SparsityCallback`; the schedule, the
prunable gammas and their statistics are the pruning core's (:mod:`compress.prune.slim`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..engine.trainer import Callback, de_parallel
from ..errors import UserError
from ..fileio import atomic_path
from ..log import warn
from ..prune import channel_groups
from ..prune.slim import HIST_FILE, SCHEDULES, gamma_stats, gamma_values, prunable_bn_keys, sparsity_at


def plot_gamma_hist(gammas: torch.Tensor, path, title: str = "") -> None:
    """Histogram of |gamma| on a log-scale x axis (PNG, written atomically); zeros are drawn at 1e-6."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    g = gammas.double().clamp_min(1e-6).numpy()
    lo, hi = min(float(g.min()), 1e-4), max(float(g.max()), 1.0)
    bins = np.logspace(math.log10(lo), math.log10(hi) + 1e-9, 60)
    fig = Figure(figsize=(7, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(g, bins=bins, color="#1f77b4")
    ax.set_xscale("log")
    for x, c in ((1e-3, "#d62728"), (1e-2, "#ff7f0e")):
        ax.axvline(x, color=c, ls="--", lw=1, label=f"{x:g}: {float((gammas < x).float().mean()):.1%} below")
    ax.set_xlabel("|gamma| of prunable BatchNorms (log scale)")
    ax.set_ylabel("channels")
    ax.set_title(title or "BatchNorm |gamma|")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


class SparsityCallback(Callback):
    """Network Slimming's L1 term on prunable BN gammas, as a trainer callback (no fork of the loop).

    ``s``: the L1 factor (``0`` only logs the gamma statistics); ``schedule``/``warmup_epochs``: see
    :func:`sparsity_at`; ``exclude``: groups that get no term (``ChannelGroups.exclude`` patterns).
    In ``on_before_step`` (every rank, after unscale/all-reduce) the term ``s * sign(gamma)`` is added to
    the gradient of each prunable gamma; the trainer clips the total gradient norm afterwards. On each
    epoch end (rank 0) the shares of the saved model's (EMA's) prunable |gamma| below 1e-2 and 1e-3 are
    added to the results.csv record and printed, and ``gamma_hist.png`` is written in the run folder.
    """

    def __init__(self, s: float, schedule: str = "constant", warmup_epochs: int = 0, exclude=()):
        if not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise UserError(f"--sparsity {s}: must be a non-negative number (e.g. 1e-3)")
        if schedule not in SCHEDULES:
            raise UserError(f"--sparsity-schedule {schedule}: unknown (choose from {', '.join(SCHEDULES)})")
        if int(warmup_epochs) < 0:
            raise UserError(f"--sparsity-warmup-epochs {warmup_epochs}: must be >= 0")
        self.s, self.schedule, self.warmup_epochs = float(s), schedule, int(warmup_epochs)
        self.exclude = list(exclude or [])
        self.keys, self.params, self.last = [], [], {}

    def options(self) -> dict:
        """The options as recorded in ``TrainOptions.extra`` (what ``--resume`` rebuilds this from)."""
        return {"sparsity": self.s, "sparsity_schedule": self.schedule,
                "sparsity_warmup_epochs": self.warmup_epochs, "sparsity_exclude": list(self.exclude)}

    @classmethod
    def from_options(cls, extra: dict):
        """The callback recorded in ``extra`` (see :meth:`options`), or None when it holds no sparsity."""
        if not extra or extra.get("sparsity") is None:
            return None
        return cls(extra["sparsity"], extra.get("sparsity_schedule", "constant"),
                   extra.get("sparsity_warmup_epochs", 0), extra.get("sparsity_exclude") or [])

    def factor(self, epoch: int, epochs: int) -> float:
        """The L1 factor used in 0-based ``epoch``."""
        return sparsity_at(self.s, epoch, epochs, self.schedule, self.warmup_epochs)

    def on_prepare(self, trainer):
        cg = channel_groups(trainer.float_model).exclude(self.exclude)
        self.keys = prunable_bn_keys(cg)
        if not self.keys:
            raise UserError("--sparsity: the model has no prunable BatchNorm (all groups excluded or unprunable)")

    def on_train_start(self, trainer):
        # resolved after SyncBN conversion and DDP wrapping (same parameter names, same objects)
        named = dict(de_parallel(trainer.model).named_parameters())
        missing = [k for k in self.keys if k not in named]
        if missing:
            raise RuntimeError(f"sparsity: BN weight {missing[0]} is not a parameter of the trained model")
        self.params = [named[k] for k in self.keys]

    @torch.no_grad()
    def on_before_step(self, trainer):
        s = self.factor(trainer.epoch, trainer.opts.epochs)
        if s == 0:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(torch.sign(p.detach()), alpha=s)

    def on_epoch_end(self, trainer, record):
        s = self.factor(trainer.epoch, trainer.opts.epochs)
        g = gamma_values(trainer.eval_model().state_dict(), self.keys)
        st = gamma_stats(g)
        self.last = {"s": s, **st}
        record.update({"sparsity": s, "gamma_lt_1e-2": st["lt_1e-2"], "gamma_lt_1e-3": st["lt_1e-3"]})
        print(f"sparsity {s:.3g}: {st['lt_1e-2']:.1%} of {st['n']} prunable BN |gamma| < 1e-2, "
              f"{st['lt_1e-3']:.1%} < 1e-3 (median {st['median']:.3g}); histogram: {trainer.out / HIST_FILE}")
        try:
            plot_gamma_hist(g, trainer.out / HIST_FILE,
                            f"{trainer.out}: epoch {trainer.epoch + 1}/{trainer.opts.epochs}, sparsity {s:.3g}: "
                            f"{st['lt_1e-2']:.1%} of {st['n']} below 1e-2")
        except Exception as e:  # a plot must never stop training
            warn(f"could not plot {HIST_FILE} ({e})")

    def on_train_end(self, trainer, report):
        report["sparsity"] = {**self.options(), "last_epoch": self.last}
