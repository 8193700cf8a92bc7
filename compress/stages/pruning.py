"""The skeleton the three pruning stages share (prune, slim, eagleeye).

Load the model with its checks, apply ``--exclude`` to its channel groups, and, once a stage has chosen
its channel counts, write the pruned artifact: cost before and after from the cost model, the per-layer
table, the per-group summary, ``channels.png`` and the :class:`~compress.stages.base.Report`.

The three ratio conventions (one per method's literature) are stated once, in
:data:`compress.options.RATIO_CONVENTIONS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..options import ModelInput, OutputOptions, option
from .base import Report, load_input_model, source_name

EXCLUDE_HELP = ("layers or groups not to prune: a layer index (0), a module path (model.2.cv1) or a group name; "
                "comma-separated or repeated")


@dataclass(kw_only=True)
class PruneCommon(ModelInput, OutputOptions):
    """Options every pruning stage takes."""

    round_to: int = option(8, "every pruned group keeps a multiple of this many channels (nearest, at least one "
                              "multiple)")
    exclude: list = option([], EXCLUDE_HELP, metavar="LAYER")

    def check(self):
        super().check()
        self.require_positive("round_to")


@dataclass
class PruneInput:
    """A loaded model ready to prune: its channel groups (excludes applied) and their cost model."""

    model: object
    groups: object
    imgsz: int
    source: str

    @property
    def cost(self):
        """The cost model of the groups at the stage's image size."""
        return self.groups.cost_model(self.imgsz)


def load_prune_input(o: PruneCommon, data: dict | None = None, seed: int = 0, need_weights: str | None = None
                     ) -> PruneInput:
    """Load the model (checks: nc against ``data``, image size) and its channel groups with ``--exclude``."""
    from ..prune import channel_groups

    model = load_input_model(o, data, seed=seed, need_weights=need_weights)
    return PruneInput(model, channel_groups(model).exclude(o.exclude), o.resolved_imgsz(), source_name(o))


def pruned_report(inp: PruneInput, counts: dict, stage: str, options: dict, details: dict | None = None) -> Report:
    """The report of a pruned model: params/GFLOPs before and after, flops_ratio, per-group and per-layer tables."""
    from ..prune.report import groups_summary, layer_rows

    cm = inp.cost
    g0, g1, p0, p1 = cm.gflops(), cm.gflops(counts), cm.params(), cm.params(counts)
    headers, rows = layer_rows(inp.groups, cm, counts, cm.per_layer(), cm.per_layer(counts))
    rep = Report(stage=stage, params=p1, gflops=g1, imgsz=inp.imgsz, flops_ratio=g1 / g0, parent=inp.source,
                 options=options)
    rep.details.update(params_before=p0, gflops_before=g0, params_ratio=p1 / p0, **(details or {}))
    rep.details.update(groups=groups_summary(inp.groups, counts), layers=[dict(zip(headers, r)) for r in rows])
    return rep


def write_pruned(inp: PruneInput, pruned, counts: dict, out: Path, report: Report, title: str) -> Report:
    """Save the pruned artifact with its report and ``channels.png``; print the per-layer table."""
    from ..model.artifact import save_model
    from ..prune.report import plot_channels
    from ..tables import format_table

    layers = report.details["layers"]
    save_model(pruned, out, report=report)
    plot_channels(inp.groups, counts, Path(out) / "channels.png", title=title)
    print(format_table(list(layers[0]), [list(r.values()) for r in layers]))
    return report


def summary_line(inp: PruneInput, report: Report) -> str:
    """``GFLOPs a -> b at N (kept x%), params p -> q`` for a stage's closing message."""
    d = report.details
    return (f"{d['gflops_before']:.3f} -> {report.gflops:.3f} GFLOPs at {inp.imgsz} (kept {report.flops_ratio:.1%}), "
            f"params {d['params_before']:,} -> {report.params:,}")
