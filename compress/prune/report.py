"""What a pruning stage reports: per-layer table rows, the per-group summary and the kept-channels chart.

Shared by ``compress prune`` and ``compress slim`` (moved here from ``compress/commands/prune.py``).
"""
from __future__ import annotations

from ..fileio import atomic_path


def layer_rows(cg, cm, counts, before, after):
    """Per-layer rows: output channels, channels of all its convs, params and GFLOPs, before -> after.

    ``cm`` is the groups' cost model, ``before``/``after`` its :meth:`per_layer` results for the full
    and the pruned counts. Returns ``(headers, rows)``.
    """
    def width(layout, c):
        return sum(c.get(cg.groups[g].name, cg.groups[g].size) for g in layout)

    rows = []
    for i, (typ, lay) in enumerate(zip(cg.layer_types, cg.layer_out)):
        ch = "-" if typ == "Detect" else f"{width(lay, {})} -> {width(lay, counts)}"
        conv = f"{before['channels'][i]} -> {after['channels'][i]}" if before["channels"][i] else "-"
        rows.append([i, typ, ch, conv, int(before["params"][i]), int(after["params"][i]),
                     round(float(before["gflops"][i]), 4), round(float(after["gflops"][i]), 4)])
    headers = ["layer", "module", "ch out", "conv channels", "params before", "params after",
               "GFLOPs before", "GFLOPs after"]
    return headers, rows


def groups_summary(cg, counts) -> dict:
    """``{group name: {kept, size, layers[, not_pruned]}}`` for every group made by a conv (report.json)."""
    return {g.name: {"kept": counts.get(g.name, g.size), "size": g.size, "layers": list(g.layers),
                     **({} if g.prunable else {"not_pruned": g.reason})}
            for g in cg.groups if g.modules}


def plot_channels(cg, counts, path, title: str | None = None) -> None:
    """Bar chart (PNG) of original vs kept channels of every prunable group, in model order.

    ``title`` names the run (e.g. ``eagleeye runs/eagleeye/exp: FLOPs kept 60.1%``); group labels are
    set at 8 pt with a width of a quarter inch per group, so they stay readable for large models.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = cg.prunable
    names = [g.name.removeprefix("model.") for g in groups]
    size = [g.size for g in groups]
    kept = [counts.get(g.name, g.size) for g in groups]
    longest = max((len(n) for n in names), default=4)
    fig = Figure(figsize=(max(8.0, 0.25 * len(groups) + 2), 4.0 + 0.07 * longest))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = range(len(groups))
    ax.bar(x, size, color="#cccccc", label="original")
    ax.bar(x, kept, color="#1f77b4", label=f"kept ({sum(kept):,} of {sum(size):,} channels)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=8)
    ax.tick_params(axis="y", labelsize=9)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel("channels", fontsize=10)
    ax.set_xlabel("prunable channel group (named by the conv that produces it)", fontsize=10)
    ax.set_title(title or "channels kept per group", fontsize=11)
    ax.legend(fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
