"""The report's figures, drawn headless with matplotlib's object API (no pyplot, no global backend).

Each ``fig_*`` function takes run records (``mom_dist.report.run_data``) and returns a
``matplotlib.figure.Figure`` whose panels carry titles and labelled axes; ``None`` when the run
holds nothing to draw. ``telemetry_figures`` is what the trainer sends to TensorBoard at each
telemetry step. Loads are shown as the share of a routing step's picks (module load / (tokens x
top_k)), so figures of runs with different batch sizes compare directly.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from mom_dist.report.run_data import chunks_of, series

POOL_NAME = {"attn": "attention", "ffn": "FFN"}
CMAP = "viridis"


def _fig(rows: int, cols: int, w: float, h: float):
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _empty(ax, title: str, why: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------ training curves
def fig_training(train: list[dict], valid: list[dict]) -> Figure | None:
    if not train and not valid:
        return None
    fig, ax = _fig(2, 2, 11, 7)
    a = ax[0, 0]
    for key, label in (("loss", "train loss (total)"), ("lm_loss", "train LM loss")):
        xs, ys = series(train, key)
        if xs:
            a.plot(xs, ys, label=label, lw=1.2)
    xs, ys = series(valid, "loss")
    if xs:
        a.plot(xs, ys, "o-", label="validation LM loss", lw=1.5)
    _style(a, "Loss", "optimizer step", "cross-entropy (nats/token)")
    a.legend(fontsize=8)
    a = ax[0, 1]
    xs, ys = series(train, "lm_loss")
    if xs:
        a.plot(xs, [math.exp(min(y, 50)) for y in ys], label="train (exp LM loss)", lw=1.2)
    xs, ys = series(valid, "ppl")
    if xs:
        a.plot(xs, ys, "o-", label="validation", lw=1.5)
    a.set_yscale("log")
    _style(a, "Perplexity", "optimizer step", "perplexity (log scale)")
    a.legend(fontsize=8)
    for a, key, title, ylabel in ((ax[1, 0], "lr", "Learning rate", "learning rate"),
                                  (ax[1, 1], "grad_norm", "Gradient norm (before clipping)", "global L2 norm")):
        xs, ys = series(train, key)
        if xs:
            a.plot(xs, ys, lw=1.2)
            _style(a, title, "optimizer step", ylabel)
        else:
            _empty(a, title, "no train records")
    fig.suptitle("Training", fontsize=13)
    return fig


# ------------------------------------------------------------------------------ module load
def load_matrix(rec: dict, chunk: int, pool: str) -> tuple[np.ndarray, int] | None:
    """(modules + 1 SKIP row) x routing steps, share of each routing step's picks."""
    rows = sorted((d for d in rec.get("detail", []) if d["chunk"] == chunk and d["pool"] == pool),
                  key=lambda d: d["step"])
    if not rows or any("skip" not in d or "tokens" not in d for d in rows):  # none, or a pre-step-level record
        return None
    n = rows[0]["n_modules"]
    m = np.zeros((n + 1, len(rows)))
    for j, d in enumerate(rows):
        picks = max(d["tokens"] * d["top_k"], 1)
        m[:n, j] = np.asarray(d["load"], dtype=float) / picks
        m[n, j] = d["skip"] / picks
    return m, n


def _heatmap(ax, m: np.ndarray, n: int, vmax: float, title: str):
    im = ax.imshow(m, aspect="auto", cmap=CMAP, vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(n + 1), [str(i) for i in range(n)] + ["SKIP"])
    ax.set_xticks(range(m.shape[1]))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("routing step")
    ax.set_ylabel("module")
    if m.size <= 160:  # annotate small grids: exact shares are what one compares
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 * vmax else "black")
    return im


def fig_load_heatmaps(records: list[dict], chunk: int) -> Figure | None:
    """Rows: chosen training steps; columns: attention, FFN. Cell: % of the routing step's picks."""
    records = [r for r in records if load_matrix(r, chunk, "attn") or load_matrix(r, chunk, "ffn")]
    if not records:
        return None
    pools = [p for p in ("attn", "ffn") if any(load_matrix(r, chunk, p) for r in records)]
    mats = {(i, p): load_matrix(r, chunk, p) for i, r in enumerate(records) for p in pools}
    vmax = max(float(m[0].max()) for m in mats.values() if m is not None) or 1.0
    n_rows = len(records)
    height = max(3.0, (0.3 * max(m[0].shape[0] for m in mats.values() if m) + 0.9) * n_rows + 0.8)
    fig, ax = _fig(n_rows, len(pools), 5.2 * len(pools) + 1, min(height, 30))
    im = None
    for i, r in enumerate(records):
        for j, p in enumerate(pools):
            mm = mats[(i, p)]
            if mm is None:
                _empty(ax[i, j], f"{POOL_NAME[p]}, step {r['step']}", "no records")
                continue
            im = _heatmap(ax[i, j], mm[0], mm[1], vmax, f"{POOL_NAME[p]} modules, training step {r['step']}")
    if im is not None:
        fig.colorbar(im, ax=ax, label="share of the routing step's picks (cells: %)", shrink=0.8)
    fig.suptitle(f"Chunk {chunk}: module load per routing step", fontsize=13)
    return fig


def fig_load_change(records: list[dict], chunk: int) -> Figure | None:
    """Per pool: rows = (routing step, module / SKIP), columns = telemetry steps of training."""
    pools = [p for p in ("attn", "ffn") if any(load_matrix(r, chunk, p) for r in records)]
    if not pools or len(records) < 1:
        return None
    n_rows_max = max(load_matrix(r, chunk, p)[0].size for r in records for p in pools if load_matrix(r, chunk, p))
    fig, ax = _fig(1, len(pools), 5.5 * len(pools) + 1, min(max(4.0, 0.16 * n_rows_max + 2), 30))
    im = None
    vmax = 0.0
    cols = {}
    for p in pools:
        cols[p] = [(r["step"], load_matrix(r, chunk, p)) for r in records if load_matrix(r, chunk, p)]
        vmax = max(vmax, max(float(m[0].max()) for _, m in cols[p]))
    for j, p in enumerate(pools):
        steps = [s for s, _ in cols[p]]
        n = cols[p][0][1][1]
        # (modules+1, H) per record -> column of length H*(modules+1), routing-step major
        grid = np.stack([m[0].T.reshape(-1) for _, m in cols[p]], axis=1)
        a = ax[0, j]
        im = a.imshow(grid, aspect="auto", cmap=CMAP, vmin=0, vmax=vmax or 1.0, interpolation="nearest")
        H = grid.shape[0] // (n + 1)
        labels = [f"h{h} {'SKIP' if i == n else f'm{i}'}" for h in range(H) for i in range(n + 1)]
        stride = max(1, len(labels) // 40)
        a.set_yticks(range(0, len(labels), stride), labels[::stride], fontsize=7)
        for h in range(1, H):
            a.axhline(h * (n + 1) - 0.5, color="white", lw=1.0)
        xt = list(range(len(steps)))
        xstride = max(1, len(xt) // 10)
        a.set_xticks(xt[::xstride], [str(s) for s in steps][::xstride])
        a.set_title(f"{POOL_NAME[p]} modules", fontsize=10)
        a.set_xlabel("training step")
        a.set_ylabel("routing step h, module m")
    fig.colorbar(im, ax=ax, label="share of the routing step's picks", shrink=0.8)
    fig.suptitle(f"Chunk {chunk}: module load over training", fontsize=13)
    return fig


# ------------------------------------------------------------------------------ depth and SKIP
def _depth(rec: dict, chunk: int, pool: str = "all") -> np.ndarray | None:
    for d in rec.get("depth", []):
        if d["chunk"] == chunk and d["pool"] == pool:
            h = np.asarray(d["hist"], dtype=float)
            return h / h.sum() if h.sum() else h
    return None


def fig_depth_skip(routing: list[dict]) -> Figure | None:
    if not routing:
        return None
    chunks = chunks_of(routing)
    fig, ax = _fig(2, 2, 11, 7)
    a = ax[0, 0]
    shown = [routing[0], routing[-1]] if len(routing) > 1 else [routing[-1]]
    width = 0.8 / max(1, len(chunks) * len(shown))
    k = 0
    for c in chunks:
        for r in shown:
            h = _depth(r, c)
            if h is None:
                continue
            a.bar(np.arange(len(h)) + (k - (len(chunks) * len(shown) - 1) / 2) * width, h, width,
                  label=f"chunk {c}, step {r['step']}")
            k += 1
    if k:
        n_bins = max(len(_depth(r, c)) for c in chunks for r in shown if _depth(r, c) is not None)
        a.set_xticks(range(0, n_bins, max(1, n_bins // 16)))
        _style(a, "Per-token depth (first and last telemetry step)",
               "non-SKIP picks of a token in a chunk (attention + FFN)", "share of tokens")
        a.legend(fontsize=8)
    else:
        _empty(a, "Per-token depth", "no depth records (older telemetry format)")
    a = ax[0, 1]
    for c in chunks:
        xs, ys = [], []
        for r in routing:
            h = _depth(r, c)
            if h is not None and h.sum():
                xs.append(r["step"])
                ys.append(float((np.arange(len(h)) * h).sum()))
        if xs:
            a.plot(xs, ys, "o-", ms=3, label=f"chunk {c}")
    _style(a, "Mean per-token depth", "training step", "non-SKIP picks per token")
    if chunks:
        a.legend(fontsize=8)
    a = ax[1, 0]
    for c in chunks:
        for p in ("attn", "ffn"):
            xs, ys = [], []
            for r in routing:
                ds = [d for d in r.get("detail", []) if d["chunk"] == c and d["pool"] == p]
                if ds:
                    xs.append(r["step"])
                    ys.append(sum(d["skip_rate"] for d in ds) / len(ds))
            if xs:
                a.plot(xs, ys, "o-", ms=3, label=f"chunk {c} {POOL_NAME[p]}")
    a.set_ylim(bottom=0)
    _style(a, "SKIP rate", "training step", "share of picks that are SKIP")
    a.legend(fontsize=8)
    a = ax[1, 1]
    xs, ys = series(routing, "router_entropy")
    a.plot(xs, ys, "o-", ms=3)
    a.ticklabel_format(axis="y", useOffset=False)
    _style(a, "Router entropy (mean over routers)", "training step", "entropy (nats)")
    fig.suptitle("Per-token depth and SKIP", fontsize=13)
    return fig


# ------------------------------------------------------------------------------ parallel
def fig_parallel(routing: list[dict], train: list[dict]) -> Figure | None:
    if not routing and not train:
        return None
    fig, ax = _fig(2, 2, 11, 7)
    a = ax[0, 0]
    if routing:
        xs = [r["step"] for r in routing]
        a.plot(xs, [r.get("ep_load_imbalance", 1.0) for r in routing], "o-", ms=3, label="worst router")
        mean = [np.mean([d["ep_load_max_over_mean"] for d in r["detail"]]) if r.get("detail") else 1.0
                for r in routing]
        a.plot(xs, mean, "s--", ms=3, label="mean over routers")
        ep = routing[-1].get("ep_size")
        _style(a, f"EP load imbalance (ep_size={ep})" if ep else "EP load imbalance",
               "training step", "max / mean picks per EP rank")
        a.axhline(1.0, color="gray", lw=0.8)
        a.legend(fontsize=8)
    else:
        _empty(a, "EP load imbalance", "no routing telemetry")
    a = ax[0, 1]
    if routing:
        xs = [r["step"] for r in routing]
        a.plot(xs, [r.get("a2a_MB_sent", 0.0) for r in routing], "o-", ms=3, label="all ranks")
        per = [max(r["a2a_bytes_per_rank"]) / 2 ** 20 if r.get("a2a_bytes_per_rank") else None for r in routing]
        if any(p is not None for p in per):
            a.plot([x for x, p in zip(xs, per) if p is not None], [p for p in per if p is not None],
                   "s--", ms=3, label="busiest rank")
        a.set_ylim(bottom=0)
        _style(a, "All-to-all payload per step (forward)", "training step", "MiB sent to other ranks")
        a.legend(fontsize=8)
    else:
        _empty(a, "All-to-all payload", "no routing telemetry")
    a = ax[1, 0]
    xs, ys = series(train, "tokens_per_s")
    if xs:
        a.plot(xs, ys, lw=1.2)
        a.set_ylim(bottom=0)
        _style(a, "Throughput", "optimizer step", "tokens / s (whole job)")
    else:
        _empty(a, "Throughput", "no train records")
    a = ax[1, 1]
    if routing:
        xs, ys = series(routing, "dropped")
        a.plot(xs, ys, "o-", ms=3)
        a.set_ylim(bottom=0)
        _style(a, "Dropped (token, module) pairs (capacity mode)", "training step", "pairs per step")
    else:
        _empty(a, "Dropped pairs", "no routing telemetry")
    fig.suptitle("Parallel execution", fontsize=13)
    return fig


# ------------------------------------------------------------------------------ helpers
def panel_titles(fig: Figure) -> list[str]:
    return [a.get_title() for a in fig.axes if a.get_title()]


def to_rgb(fig: Figure) -> np.ndarray:
    """(H, W, 3) uint8 image of a figure (for TensorBoard)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def telemetry_figures(history: list[dict]) -> list[tuple[str, Figure]]:
    """TensorBoard images at a telemetry step: this step's load heatmaps, the load over
    training so far, and the depth / SKIP panels."""
    out = []
    for c in chunks_of(history[-1:]):
        for name, fig in ((f"load_chunk{c}", fig_load_heatmaps(history[-1:], c)),
                          (f"load_change_chunk{c}", fig_load_change(history, c))):
            if fig is not None:
                out.append((name, fig))
    fig = fig_depth_skip(history)
    if fig is not None:
        out.append(("depth_skip", fig))
    return out
