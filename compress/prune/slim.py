"""Network Slimming (Liu et al., ICCV 2017): L1 sparsity on BatchNorm scale factors, then one global cut.

1. **Sparsity training** (:class:`SparsityCallback`, ``compress train --sparsity S``): after backward, in
   the trainer's ``on_before_step`` hook (gradients already unscaled under AMP and all-reduced under
   DDP), ``s * sign(gamma)`` is added to the gradient of every *prunable* BatchNorm gamma: the BNs of
   the producers of the prunable channel groups (never the BNs whose channels cannot be pruned, such as
   ShuffleBlock outputs, nor groups given to ``--exclude``). Each epoch the share of those gammas below
   1e-2 and 1e-3 goes into results.csv and ``gamma_hist.png`` shows the |gamma| histogram.
2. **Slimming** (:func:`slim_plan`, :func:`slim`): every channel of every prunable group gets one score,
   the mean |gamma| over all the group's BNs (a residual group is one unit: its channels are kept or cut
   together in every BN of the group). One global threshold over these scores removes ``global_percent``
   of the prunable channels; each group's remaining count is then rounded to the nearest multiple of
   ``round_to`` (never fewer than ``round_to``), the highest-scoring channels are kept, the plan is
   applied with the pruning core and the BN statistics are recalibrated (adaptive BN).
3. **Fine-tuning**: ``compress train --weights SLIM_DIR`` (the slimmed artifact is an ordinary one).

Sparsity schedules (``s`` is ``--sparsity``, ``E`` the epochs, ``K`` the warmup epochs, ``e`` the
0-based epoch; the value is constant within an epoch):

- ``constant``: ``s`` for every epoch ``e >= K``;
- ``cosine-decay``: ``s * (0.01 + 0.99 * (1 + cos(pi * t)) / 2)`` with ``t = (e - K) / max(E - K - 1, 1)``,
  i.e. ``s`` in the first epoch after warmup down to ``0.01 * s`` in the last one;
- warmup: ``0`` for ``e < K`` under either schedule.

"Not trained sparse" rule: slimming warns when fewer than ``SPARSE_SHARE`` (10%) of the prunable
gammas are below ``SPARSE_BELOW`` (1e-2). A model trained without ``--sparsity`` has almost none there
(BN gammas stay near 1), so removing a large share of its channels cuts channels that carry signal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine.trainer import Callback, de_parallel
from ..errors import UserError
from ..fileio import atomic_path
from .groups import channel_groups
from .importance import bn_scores
from .plan import apply_plan_to_model, plan_from_counts, round_keep

SCHEDULES = ("constant", "cosine-decay")
SPARSE_BELOW = 1e-2   # a gamma below this counts as "sparse"
SPARSE_SHARE = 0.10   # slimming warns when fewer than this share of prunable gammas are sparse
HIST_FILE = "gamma_hist.png"


# ----------------------------------------------------------------------------------------- gammas
def sparsity_at(s: float, epoch: int, epochs: int, schedule: str = "constant", warmup_epochs: int = 0) -> float:
    """The L1 factor used in 0-based ``epoch`` of ``epochs`` (see the module docstring for the formulas)."""
    if schedule not in SCHEDULES:
        raise UserError(f"--sparsity-schedule {schedule}: unknown (choose from {', '.join(SCHEDULES)})")
    if epoch < warmup_epochs:
        return 0.0
    if schedule == "constant":
        return float(s)
    t = min(max((epoch - warmup_epochs) / max(epochs - warmup_epochs - 1, 1), 0.0), 1.0)
    return float(s) * (0.01 + 0.99 * (1 + math.cos(math.pi * t)) / 2)


def prunable_bn_keys(cg) -> list:
    """State_dict keys of the BN weights (gammas) of every prunable group's producers, in model order."""
    return [k for g in cg.prunable for k in g.producers if k.endswith(".bn.weight")]


def gamma_values(state_dict: dict, keys) -> torch.Tensor:
    """All |gamma| of the BN weights ``keys`` as one flat float32 CPU tensor."""
    if not keys:
        return torch.zeros(0)
    return torch.cat([state_dict[k].detach().float().abs().flatten().cpu() for k in keys])


def gamma_stats(gammas: torch.Tensor) -> dict:
    """``{"n", "lt_1e-2", "lt_1e-3", "median"}``: count, shares of |gamma| below 1e-2 / 1e-3, median."""
    n = int(gammas.numel())
    if not n:
        return {"n": 0, "lt_1e-2": 0.0, "lt_1e-3": 0.0, "median": 0.0}
    return {"n": n, "lt_1e-2": float((gammas < 1e-2).float().mean()), "lt_1e-3": float((gammas < 1e-3).float().mean()),
            "median": float(gammas.median())}


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
                            f"epoch {trainer.epoch + 1}/{trainer.opts.epochs}, sparsity {s:.3g}: "
                            f"{st['lt_1e-2']:.1%} of {st['n']} below 1e-2")
        except Exception as e:  # a plot must never stop training
            print(f"warning: could not plot {HIST_FILE} ({e})")

    def on_train_end(self, trainer, report):
        report["sparsity"] = {**self.options(), "last_epoch": self.last}


# ----------------------------------------------------------------------------------------- pruning
def channel_scores(cg, state_dict: dict) -> dict:
    """Per-channel slimming score of every prunable group that has BNs: mean |gamma| over its BNs.

    Returns ``{group name: float32 tensor of size group.size}``; groups without a BN are left out.
    """
    sums = bn_scores(cg, state_dict)
    out = {}
    for g in cg.prunable:
        n = sum(k.endswith(".bn.weight") for k in g.producers)
        if n:
            out[g.name] = sums[g.name] / n
    return out


@dataclass
class SlimPlan:
    """The result of :func:`slim_plan`.

    ``threshold``: the lowest score left above the global cut (before rounding); ``counts``: kept channels per
    prunable group (after rounding); ``plan``: kept indices (core plan format); ``held``: groups held at
    the minimum ``{name: channels the threshold alone would keep}``; ``removed``: achieved share of
    prunable channels removed (after rounding); ``below``: share under the threshold (before rounding).
    """

    threshold: float
    counts: dict
    plan: dict
    scores: dict
    held: dict
    removed: float
    below: float
    channels: int
    kept: int
    gamma: dict = field(default_factory=dict)


def _check_percent(p):
    if not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise UserError(f"--global-percent {p}: must be in [0, 1) (the share of prunable channels to remove)")


def slim_plan(cg, state_dict: dict, global_percent: float, round_to: int = 8, source: str = "weights") -> SlimPlan:
    """Choose the channels to keep by one global |gamma| threshold (see the module docstring).

    ``global_percent`` in [0, 1) is the share of the prunable channels (a coupled group counts its
    channels once) to remove: the ``floor(p * N)`` lowest-scoring of the ``N`` prunable channels fall
    under the threshold (the score of the lowest channel left above it; channels tied with it are
    cut evenly across their groups, which only matters for barely trained weights). Each group then keeps
    ``round_keep(n)`` channels (``n``: its channels above the threshold), its highest-scoring ones.
    Raises UserError for a percent outside [0, 1), no prunable group with a BatchNorm, or gammas that
    are all equal (untrained weights: nothing to rank).
    """
    _check_percent(global_percent)
    if round_to < 1:
        raise UserError(f"--round-to {round_to}: must be a positive integer")
    scores = channel_scores(cg, state_dict)
    if not scores:
        raise UserError(f"{source}: no prunable channel group has a BatchNorm "
                        f"(nothing for Network Slimming to rank; everything excluded or unprunable)")
    gammas = gamma_values(state_dict, prunable_bn_keys(cg))
    if float(gammas.max() - gammas.min()) == 0:
        raise UserError(f"{source}: every prunable BatchNorm |gamma| is {float(gammas[0]):g}: these weights "
                        f"were never trained, there is nothing to rank (train with --sparsity first)")
    flat = torch.cat(list(scores.values()))
    n_all = flat.numel()
    n_cut = min(int(math.floor(round(global_percent * n_all, 6))), n_all - 1)
    # ties (barely trained weights) are cut evenly across groups: second key = position within the group
    frac = torch.cat([(torch.arange(len(v)) + 0.5) / len(v) for v in scores.values()])
    order = torch.from_numpy(np.lexsort((frac.numpy(), flat.double().numpy())))
    cut = torch.zeros(n_all, dtype=torch.bool)
    cut[order[:n_cut]] = True
    thr = float(flat[order[n_cut]])
    by_name = cg.by_name
    counts, held = {}, {}
    off = 0
    for name, s in scores.items():
        size = by_name[name].size
        n = size - int(cut[off:off + size].sum())
        off += size
        counts[name] = round_keep(n, size, round_to)
        if n < min(round_to, size):
            held[name] = n
    plan = plan_from_counts(cg, counts, scores)
    kept = sum(counts.values())
    return SlimPlan(threshold=thr, counts=counts, plan=plan, scores=scores, held=held, removed=1 - kept / n_all,
                    below=n_cut / n_all, channels=n_all, kept=kept, gamma=gamma_stats(gammas))


def not_sparse_warning(gamma: dict, global_percent: float) -> str | None:
    """The warning for weights that were not trained sparse (module docstring's rule), or None."""
    if gamma["lt_1e-2"] >= SPARSE_SHARE or global_percent == 0:
        return None
    return (f"the weights do not look sparsity-trained: only {gamma['lt_1e-2']:.1%} of the {gamma['n']} prunable "
            f"BN |gamma| are below {SPARSE_BELOW:g} (slimming expects >= {SPARSE_SHARE:.0%}); removing "
            f"{global_percent:.0%} of the channels will cut channels that matter (train with "
            f"`compress train --sparsity 1e-3` first, and fine-tune after slimming)")


def _eval_batches(data, imgsz, batch, n, workers, seed):
    from ..data.dataset import create_dataloader
    from ..engine.validate import load_batches

    if n is None:
        loader, _ = create_dataloader(data["val"], imgsz, batch, augment=False, workers=workers, nc=data["nc"],
                                      prefix="val: ")
        return loader
    return load_batches(data["val"], imgsz, batch, n, data["nc"], seed=seed, workers=workers, prefix="val: ")


def slim(weights, data, global_percent: float, *, cfg=None, round_to: int = 8, exclude=(), imgsz: int = 320,
         batch: int = 16, bn_batches: int = 20, eval_batches: int | None = None, workers: int = 2,
         device: str = "cpu", seed: int = 0, out="runs/slim/exp", verbose: bool = True) -> dict:
    """Slim an artifact end to end (what ``compress slim`` runs); returns the report written to ``out``.

    Loads ``weights`` (with ``cfg`` for a bare state_dict), plans the cut with :func:`slim_plan` over
    the groups not matched by ``exclude``, applies it, recalibrates BN statistics on ``bn_batches``
    unaugmented training batches and evaluates on ``eval_batches`` val batches (None: the whole split)
    before pruning, after pruning and after recalibration. Writes the pruned artifact (model.yaml,
    weights.pt, report.json) and ``channels.png`` to ``out``.
    """
    from ..data.dataset import load_data_yaml
    from ..engine.trainer import select_device
    from ..engine.validate import adaptive_bn, evaluate_model, load_batches
    from ..model.artifact import load_model, save_model
    from ..model.profile import check_imgsz
    from ..tables import format_table
    from .report import groups_summary, layer_rows, plot_channels

    _check_percent(global_percent)
    if round_to < 1:
        raise UserError(f"--round-to {round_to}: must be a positive integer")
    if bn_batches < 1:
        raise UserError(f"--bn-batches {bn_batches}: must be >= 1")
    if eval_batches is not None and eval_batches < 1:
        raise UserError(f"--eval-batches {eval_batches}: must be >= 1 or 'all'")
    if batch < 1:
        raise UserError(f"--batch {batch}: must be >= 1")
    if not weights:
        raise UserError("give --weights (a trained artifact dir or .pt; slimming ranks trained BN gammas)")
    model = load_model(cfg, weights).eval()
    dset = load_data_yaml(data)
    if model.nc != dset["nc"]:
        raise UserError(f"{data}: nc={dset['nc']} but the model predicts {model.nc} classes")
    check_imgsz(model, imgsz)
    dev = select_device(device)
    cg = channel_groups(model).exclude(exclude)
    sp = slim_plan(cg, model.state_dict(), global_percent, round_to, source=str(weights))

    warnings = []
    w = not_sparse_warning(sp.gamma, global_percent)
    if w:
        warnings.append(w)
    if sp.held:
        warnings.append(f"{len(sp.held)} group(s) held at the minimum of {round_to} channels (the threshold would "
                        f"keep fewer): " + ", ".join(f"{k} (threshold keeps {v})" for k, v in sp.held.items()))
    for line in warnings:
        print(f"warning: {line}")

    val = _eval_batches(dset, imgsz, batch, eval_batches, workers, seed)
    model.to(dev)
    m_before = evaluate_model(model, val, dset, dev)
    pruned = apply_plan_to_model(model, sp.plan, cg).eval()
    m_pruned = evaluate_model(pruned, val, dset, dev)
    bn = load_batches(dset["train"], imgsz, batch, bn_batches, dset["nc"], seed=seed, workers=workers,
                      prefix="adaptive BN: ")
    adaptive_bn(pruned, bn, dev)
    m_final = evaluate_model(pruned, val, dset, dev)

    cm = cg.cost_model(imgsz)
    counts = sp.counts
    g0, g1, p0, p1 = cm.gflops(), cm.gflops(counts), cm.params(), cm.params(counts)
    headers, rows = layer_rows(cg, cm, counts, cm.per_layer(), cm.per_layer(counts))

    def maps(m):
        return {"map50": m["map50"], "map": m["map"]}

    out = Path(out)
    report = {
        "stage": "slim",
        "parent": str(weights),
        "options": {"global_percent": global_percent, "round_to": round_to, "exclude": list(exclude or []),
                    "imgsz": imgsz, "batch": batch, "bn_batches": bn_batches,
                    "eval_batches": "all" if eval_batches is None else eval_batches, "data": str(data),
                    "weights": str(weights), "cfg": cfg, "seed": seed},
        "imgsz": imgsz,
        "threshold": sp.threshold,
        "global_percent": global_percent,
        "channels_removed": sp.removed, "channels_below_threshold": sp.below,
        "prunable_channels": sp.channels, "kept_channels": sp.kept,
        "flops_ratio": g1 / g0, "params_ratio": p1 / p0,
        "gflops_before": g0, "gflops": g1, "params_before": p0, "params": p1,
        "map_before": maps(m_before), "map_pruned": maps(m_pruned), "map_recalibrated": maps(m_final),
        "map50": m_final["map50"], "map": m_final["map"],
        "precision": m_final["precision"], "recall": m_final["recall"],
        "gamma": sp.gamma,
        "held_at_minimum": sp.held,
        "warnings": warnings,
        "groups": groups_summary(cg, counts),
        "layers": [dict(zip(headers, r)) for r in rows],
    }
    save_model(pruned, out, report=report)
    plot_channels(cg, counts, out / "channels.png")
    if verbose:
        print(format_table(headers, rows))
        print(f"\nslimmed {weights}: threshold |gamma| {sp.threshold:.5g} (asked to remove {global_percent:.1%} of "
              f"{sp.channels} prunable channels; removed {sp.removed:.1%} after rounding to {round_to})")
        print(f"GFLOPs {g0:.3f} -> {g1:.3f} at {imgsz} ({g1 / g0:.1%}), params {p0:,} -> {p1:,} ({p1 / p0:.1%})")
        print(format_table(["mAP", "before pruning", "after pruning", "after BN recalibration"],
                           [["mAP@0.5", m_before["map50"], m_pruned["map50"], m_final["map50"]],
                            ["mAP@0.5:0.95", m_before["map"], m_pruned["map"], m_final["map"]]]))
        print(f"wrote {out} (model.yaml, weights.pt, report.json, channels.png); fine-tune it with "
              f"`compress train --weights {out} --data {data}`")
    return report
