"""The ``slim`` stage: Network Slimming's cut by one global BatchNorm |gamma| threshold.

The plan (which channels go) is :func:`compress.prune.slim.slim_plan`; this stage loads the model, applies
the plan, recalibrates BatchNorm statistics (adaptive BN), evaluates before and after and writes the
artifact through the pruning skeleton. Sparsity training is the train stage with
:class:`~compress.stages.sparsity.SparsityCallback`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..log import warn
from ..options import DataInput, DeviceOptions, option
from .base import DataInfo, Report, output_dir
from .pruning import PruneCommon, load_prune_input, pruned_report, summary_line, write_pruned

PERCENT_HELP = ("share of the prunable CHANNELS to REMOVE, in [0, 1) (as in the reference tool; prune --ratio "
                "and eagleeye --remain-ratio speak of FLOPs)")


@dataclass(kw_only=True)
class SlimOptions(PruneCommon, DataInput, DeviceOptions):
    """What ``compress slim`` takes."""

    data: str | None = option(None, "dataset data.yaml (BN recalibration and evaluation)", required=True,
                              recipe=False)
    global_percent: float | None = option(None, PERCENT_HELP, required=True)
    batch: int = option(16, "batch size", flags=("--batch-size",))
    bn_batches: int = option(20, "training batches for BatchNorm recalibration after the cut (the default takes up "
                                 "to 20: all of a smaller split)")
    eval_batches: int | str = option("all", "val batches to evaluate on before/after (a number, or 'all')")
    seed: int = option(0, "seed of the BN recalibration / eval batch choice")

    def check(self):
        super().check()
        self.require_range("global_percent", 0, 1, hi_open=True, what="the share of prunable channels to remove")
        self.require_positive("batch", "bn_batches")
        self.eval_batch_count()

    def eval_batch_count(self) -> int | None:
        """``--eval-batches`` as a count (None for 'all'); UserError for anything else."""
        v = self.eval_batches
        if v is None or str(v).strip().lower() == "all":
            return None
        try:
            n = int(v)
        except (TypeError, ValueError):
            n = 0
        if isinstance(v, bool) or n < 1 or str(n) != str(v).strip():
            raise UserError(f"--eval-batches {v}: give a positive number of batches or 'all'")
        return n


def _eval_batches(data, imgsz, batch, n, workers, seed):
    from ..data.dataset import create_dataloader
    from ..engine.validate import load_batches

    if n is None:
        loader, _ = create_dataloader(data["val"], imgsz, batch, augment=False, workers=workers, nc=data["nc"],
                                      prefix="val: ")
        return loader
    return load_batches(data["val"], imgsz, batch, n, data["nc"], seed=seed, workers=workers, prefix="val: ")


def preflight(o: SlimOptions, model, info: DataInfo) -> None:
    """The excludes match, the model fits the dataset, and the splits hold the batches asked for."""
    from ..prune import channel_groups

    info.check_model(model)
    channel_groups(model).exclude(o.exclude)
    info.need("train", o.bn_batches, o.batch, "--bn-batches", "bn_batches" in o.given)
    if o.eval_batch_count() is not None:
        info.need("val", o.eval_batch_count(), o.batch, "--eval-batches", "eval_batches" in o.given)


def run(o: SlimOptions, verbose: bool = True) -> Report:
    """Slim, recalibrate, evaluate and write the artifact; returns its report.

    Evaluates on ``--eval-batches`` val batches (all by default) before pruning, after pruning and after
    recalibration on ``--bn-batches`` unaugmented training batches.
    """
    from ..data.dataset import load_data_yaml
    from ..engine.device import select_device
    from ..engine.validate import adaptive_bn, evaluate_model, load_batches
    from ..prune import apply_plan_to_model
    from ..prune.slim import not_sparse_warning, slim_plan
    from ..tables import format_table

    o.validate()
    n_eval = o.eval_batch_count()
    data = load_data_yaml(o.data)
    inp = load_prune_input(o, data, need_weights="slimming ranks the BN gammas of trained weights (an artifact "
                                                 "dir or .pt)")
    preflight(o, inp.model, DataInfo.of(data))
    sp = slim_plan(inp.groups, inp.model.state_dict(), o.global_percent, o.round_to, source=inp.source)
    out = output_dir(o, "slim")
    warnings = [w for w in [not_sparse_warning(sp.gamma, o.global_percent)] if w]
    if sp.held:
        warnings.append(f"{len(sp.held)} group(s) held at the minimum of {o.round_to} channels (the threshold would "
                        f"keep fewer): " + ", ".join(f"{k} (threshold keeps {v})" for k, v in sp.held.items()))
    for line in warnings:
        warn(line)

    dev = select_device(o.device)
    imgsz = inp.imgsz
    val = _eval_batches(data, imgsz, o.batch, n_eval, o.workers, o.seed)
    model = inp.model.to(dev)
    m_before = evaluate_model(model, val, data, dev)
    pruned = apply_plan_to_model(model, sp.plan, inp.groups).eval()
    m_pruned = evaluate_model(pruned, val, data, dev)
    bn = load_batches(data["train"], imgsz, o.batch, o.bn_batches, data["nc"], seed=o.seed, workers=o.workers,
                      prefix="adaptive BN: ")
    adaptive_bn(pruned, bn, dev)
    m_final = evaluate_model(pruned, val, data, dev)

    def maps(m):
        return {"map50": m["map50"], "map": m["map"]}

    rep = pruned_report(inp, sp.counts, "slim", o.to_dict() | {"imgsz": imgsz}, {
        "threshold": sp.threshold, "global_percent": o.global_percent,
        "channels_removed": sp.removed, "channels_below_threshold": sp.below,
        "prunable_channels": sp.channels, "kept_channels": sp.kept,
        "map_before": maps(m_before), "map_pruned": maps(m_pruned), "map_recalibrated": maps(m_final),
        "gamma": sp.gamma, "held_at_minimum": sp.held, "warnings": warnings})
    rep.set_metrics(m_final)
    write_pruned(inp, pruned, sp.counts, out, rep,
                 title=f"slim {out}: {o.global_percent:.0%} of channels asked, {sp.removed:.1%} removed, "
                       f"FLOPs kept {rep.flops_ratio:.1%}")
    if verbose:
        print(f"\nslimmed {inp.source}: threshold |gamma| {sp.threshold:.5g} (asked to remove "
              f"{o.global_percent:.1%} of {sp.channels} prunable channels; removed {sp.removed:.1%} after "
              f"rounding to {o.round_to})")
        print(f"{summary_line(inp, rep)} ({rep.details['params_ratio']:.1%} of the params)")
        print(format_table(["mAP", "before pruning", "after pruning", "after BN recalibration"],
                           [["mAP@0.5", m_before["map50"], m_pruned["map50"], m_final["map50"]],
                            ["mAP@0.5:0.95", m_before["map"], m_pruned["map"], m_final["map"]]]))
        print(f"wrote {out} (model.yaml, weights.pt, report.json, channels.png); fine-tune it with "
              f"`compress train --weights {out} --data {o.data}`")
    return rep
