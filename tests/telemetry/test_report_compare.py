"""Study figures (``mom_dist.report.compare``): what is drawn is what the runs hold."""

import math

from mom_dist.report import compare
from mom_dist.report.figures import panel_titles
from mom_dist.report.run_data import RunData


def _run(name, losses):
    return RunData(name, valid=[{"kind": "valid", "step": 10 * (i + 1), "loss": v} for i, v in enumerate(losses)])


def test_curves_draw_every_seed_and_the_group_mean():
    groups = {"A": [_run("a1", [5.0, 4.0]), _run("a2", [5.2, 4.4])], "B": [_run("b1", [6.0, 5.5])]}
    fig = compare.fig_compare_curves(groups)
    assert panel_titles(fig) == ["Validation LM loss", "Validation perplexity"]
    loss_ax, ppl_ax = fig.axes[:2]
    lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
    assert list(lines["A (mean of 2)"].get_ydata()) == [5.1, 4.2]  # the mean of the seeds, step by step
    assert list(lines["B (mean of 1)"].get_xdata()) == [10, 20]
    assert len(loss_ax.get_lines()) == 3 + 2  # every run, plus one mean per group
    ppl = {ln.get_label(): ln for ln in ppl_ax.get_lines()}
    assert ppl["B (mean of 1)"].get_ydata()[1] == math.exp(5.5)


def test_bars_are_means_with_min_max_and_the_seeds():
    fig = compare.fig_compare_bars({"A": [10.0, 12.0, 14.0], "B": [20.0]}, "validation perplexity")
    ax = fig.axes[0]
    assert [round(p.get_height(), 6) for p in ax.patches] == [12.0, 20.0]
    from matplotlib.collections import PathCollection

    dots = [tuple(map(float, o)) for c in ax.collections if isinstance(c, PathCollection) for o in c.get_offsets()]
    assert sorted(dots) == [(0, 10.0), (0, 12.0), (0, 14.0), (1, 20.0)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "B"]
