"""Draw every figure of a run into PNG files and write the HTML page that shows them.

    manifest = build_report("runs/quickstart", "runs/quickstart/report", steps=[50, 300])

The manifest lists each figure (file, title, panel titles); the page is built from it, so the
page and the files cannot disagree. Figures that cannot be drawn (no telemetry yet) are left
out and listed in ``manifest["missing"]``.
"""

from __future__ import annotations

import html
import os
import time

from mom_dist.report import figures
from mom_dist.report.run_data import RunData, chunks_of, pick_steps


def _figures(run: RunData, steps: list[int] | None):
    yield "training", "Loss, perplexity, learning rate and gradient norm", figures.fig_training(run.train, run.valid)
    chosen = pick_steps(run.routing, steps)
    for c in chunks_of(run.routing):
        yield (f"load_chunk{c}", f"Chunk {c}: module load (module x routing step) at training steps "
               f"{', '.join(str(r['step']) for r in chosen)}", figures.fig_load_heatmaps(chosen, c))
        yield f"load_change_chunk{c}", f"Chunk {c}: module load over training", figures.fig_load_change(run.routing, c)
    yield "depth_skip", "Per-token depth, SKIP rate and router entropy", figures.fig_depth_skip(run.routing)
    yield ("parallel", "EP load imbalance, all-to-all traffic, throughput and drops",
           figures.fig_parallel(run.routing, run.train))


def build_report(run: RunData, out_dir: str, steps: list[int] | None = None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"run_dir": run.run_dir, "figures": [], "missing": []}
    for name, title, fig in _figures(run, steps):
        if fig is None:
            manifest["missing"].append(name)
            continue
        fname = f"{name}.png"
        fig.savefig(os.path.join(out_dir, fname))
        manifest["figures"].append({"name": name, "file": fname, "title": title,
                                    "panels": figures.panel_titles(fig)})
    manifest["html"] = os.path.join(out_dir, "index.html")
    with open(manifest["html"], "w") as f:
        f.write(_page(run, manifest))
    return manifest


def _summary(run: RunData) -> list[str]:
    lines = []
    if run.train:
        t = run.train[-1]
        lines.append(f"last train step {t['step']}: loss {t.get('loss', float('nan')):.4f}, "
                     f"{t.get('tokens_per_s', 0):,.0f} tokens/s")
    if run.valid:
        v = run.valid[-1]
        lines.append(f"last validation (step {v['step']}): loss {v.get('loss', float('nan')):.4f}, "
                     f"perplexity {v.get('ppl', float('nan')):.2f}")
    if run.routing:
        r = run.routing[-1]
        lines.append(f"{len(run.routing)} telemetry records; last (step {r['step']}): SKIP rate "
                     f"{r.get('skip_rate', 0):.3f}, mean depth {r.get('depth_mean', 0):.2f}, EP imbalance "
                     f"{r.get('ep_load_imbalance', 1):.2f}, all-to-all {r.get('a2a_MB_sent', 0):.2f} MiB/step")
    cfg = run.config or {}
    m, p = cfg.get("model", {}), cfg.get("parallel", {})
    if m:
        lines.append(f"model: d_model {m.get('d_model')}, {m.get('n_chunks')} chunk(s) x {m.get('n_steps')} routing "
                     f"steps, {m.get('n_attn_modules')} attention / {m.get('n_ffn_modules')} FFN modules; "
                     f"ep_size {p.get('ep_size')}, ZeRO {p.get('zero_stage')}, {p.get('dispatcher')}")
    return lines


def _page(run: RunData, manifest: dict) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
             f"<title>mom-report: {e(run.name)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}"
             "figcaption{font-weight:bold;margin-bottom:.4em}</style></head><body>",
             f"<h1>Run {e(run.name)}</h1>", f"<p>{e(os.path.abspath(run.run_dir))} - report written "
             f"{e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>", "<ul>"]
    parts += [f"<li>{e(line)}</li>" for line in _summary(run)]
    parts.append("</ul>")
    if manifest["missing"]:
        parts.append(f"<p>Not drawn (no data): {e(', '.join(manifest['missing']))}</p>")
    for f in manifest["figures"]:
        parts.append(f"<figure id='{e(f['name'])}'><figcaption>{e(f['title'])}</figcaption>"
                     f"<img src='{e(f['file'])}' alt='{e(f['title'])}'></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
