"""The ``prune`` stage: one-shot structured pruning to a FLOPs budget (L1 or BN-gamma importance)."""
from __future__ import annotations

from dataclasses import dataclass

from ..options import option
from .base import Report, output_dir
from .pruning import PruneCommon, load_prune_input, pruned_report, summary_line, write_pruned

RATIO_HELP = ("share of the model's FLOPs to REMOVE, in (0, 1): 0.5 leaves at most half of the GFLOPs at --imgsz "
              "(thop convention, whole model); like torch-pruning's pruning_ratio, but of FLOPs, not channels. "
              "(eagleeye --remain-ratio is the share to KEEP, slim --global-percent a share of channels)")


@dataclass(kw_only=True)
class PruneOptions(PruneCommon):
    """What ``compress prune`` takes."""

    ratio: float | None = option(None, RATIO_HELP, required=True)
    method: str = option("l1", "channel importance: l1 = L1 norm of the producing filters, bn = BN |gamma|",
                         choices=("l1", "bn"))
    global_: bool = option(False, "rank channels globally (importance normalised per group by its mean) instead "
                                  "of the same channel ratio in every group")
    seed: int = option(0, "seed of the random weights of --cfg without --weights")

    def check(self):
        super().check()
        self.require_range("ratio", 0, 1, lo_open=True, hi_open=True, what="the share of FLOPs to remove")


def _counts(o: PruneOptions, groups, model, imgsz):
    from ..prune import group_scores, keep_counts_for_ratio

    scores = group_scores(groups, model.state_dict(), o.method)
    mode = "global" if o.global_ else "uniform"
    return scores, keep_counts_for_ratio(groups, 1 - o.ratio, imgsz, scores, mode=mode, round_to=o.round_to)


def preflight(o: PruneOptions, model, info=None) -> None:
    """The excludes match and the budget can be met, before anything is written."""
    from ..prune import channel_groups

    _counts(o, channel_groups(model).exclude(o.exclude), model, o.resolved_imgsz())


def run(o: PruneOptions) -> Report:
    """Prune to the budget, write the artifact (model.yaml, weights.pt, report.json, channels.png)."""
    from ..prune import apply_plan_to_model, plan_from_counts

    o.validate()
    inp = load_prune_input(o, seed=o.seed)
    scores, counts = _counts(o, inp.groups, inp.model, inp.imgsz)
    out = output_dir(o, "prune")
    mode = "global" if o.global_ else "uniform"
    pruned = apply_plan_to_model(inp.model, plan_from_counts(inp.groups, counts, scores), inp.groups)
    rep = pruned_report(inp, counts, "prune", o.to_dict() | {"imgsz": inp.imgsz})
    write_pruned(inp, pruned, counts, out, rep,
                 title=f"prune {out}: {o.method} {mode}, FLOPs kept {rep.flops_ratio:.1%} (asked {1 - o.ratio:.1%})")
    print(f"\npruned {inp.source} ({o.method}, {mode}, round to {o.round_to}): {summary_line(inp, rep)}; "
          f"asked to remove {o.ratio:.1%}")
    print(f"wrote {out} (model.yaml, weights.pt, report.json, channels.png)")
    return rep
