"""Figures that compare several runs (a study: models x seeds), drawn like the run report's.

    fig = fig_compare_curves({"GPT-6": [run_s1, run_s2], "MoM deep": [...]})   # RunData lists
    fig = fig_compare_bars({"GPT-6": [31.2, 30.9, 31.5], ...}, "validation perplexity")

Curves: the validation loss of every run over its optimizer steps, one colour per group (each
seed a line; a group's mean as a thicker line where its runs share steps). Bars: a group's mean
with its min..max as the error bar and every seed as a dot. Reads ``run_data`` records only.
"""

from __future__ import annotations

import math

from matplotlib.figure import Figure

from mom_dist.report.figures import _empty, _fig, _style
from mom_dist.report.run_data import RunData, series


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def fig_compare_curves(groups: dict[str, list[RunData]], title: str = "Validation loss during training") -> Figure:
    fig, ax = _fig(1, 2, 12, 4.5)
    for a, key, name, ylabel, transform in (
            (ax[0, 0], "loss", "Validation LM loss", "validation LM loss (nats/token)", None),
            (ax[0, 1], "loss", "Validation perplexity", "validation perplexity (log scale)", "exp")):
        drawn = False
        for colour, (label, runs) in zip(_colours(len(groups)), groups.items()):
            curves = [series(r.valid, key) for r in runs]
            curves = [(xs, [math.exp(min(y, 50)) for y in ys] if transform else ys) for xs, ys in curves if xs]
            for xs, ys in curves:
                a.plot(xs, ys, color=colour, lw=0.8, alpha=0.45)
                drawn = True
            if curves and all(xs == curves[0][0] for xs, _ in curves):
                mean = [sum(c[1][i] for c in curves) / len(curves) for i in range(len(curves[0][0]))]
                a.plot(curves[0][0], mean, color=colour, lw=2.0, label=f"{label} (mean of {len(curves)})")
        if not drawn:
            _empty(a, name, "no validation records")
            continue
        if transform:
            a.set_yscale("log")
        _style(a, name, "optimizer step", ylabel)
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=13)
    return fig


def fig_compare_bars(groups: dict[str, list[float]], ylabel: str, title: str | None = None,
                     log: bool = False) -> Figure:
    fig, ax = _fig(1, 1, max(6.0, 1.3 * len(groups) + 2), 4.5)
    a = ax[0, 0]
    colours = _colours(len(groups))
    for i, (label, values) in enumerate(groups.items()):
        if not values:
            continue
        mean = sum(values) / len(values)
        a.bar(i, mean, color=colours[i], alpha=0.6, yerr=[[mean - min(values)], [max(values) - mean]], capsize=4)
        a.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        a.annotate(f"{mean:.4g}", (i, mean), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    a.set_xticks(range(len(groups)), list(groups), rotation=15, ha="right", fontsize=8)
    if log:
        a.set_yscale("log")
    _style(a, title or ylabel, "", ylabel)
    return fig
