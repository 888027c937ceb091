"""The results file of ``paper_study.py``: tables, neutral findings and plots (``mom_dist.report``),
rewritten after every stage with what is known so far."""

from __future__ import annotations

import os
import statistics

LABELS = {"gpt": "GPT (vanilla, L=6)", "mom_deep": "MoM deep (H=8, K=1)", "mom_shallow": "MoM shallow (H=2, K=2)"}


def _label(key: str, best: str | None) -> str:
    if key.endswith("_pruned_recovered"):
        return f"{LABELS[best]} pruned + recovery"
    if key.endswith("_pruned"):
        return f"{LABELS[best]} pruned"
    return LABELS[key]


def _groups(state: dict) -> dict:
    """group key -> list of per-seed eval records (finished seeds only)."""
    out: dict[str, list] = {}
    for key, ev in state["evals"].items():
        group = key.rsplit("_s", 1)[0]
        out.setdefault(group, []).append(ev)
    order = ["gpt", "mom_deep", "mom_shallow"]
    if state.get("best"):
        order += [f"{state['best']}_pruned", f"{state['best']}_pruned_recovered"]
    return {k: out[k] for k in order if k in out}


def _stats(values: list[float]) -> dict:
    mean = statistics.mean(values)
    return {"mean": mean, "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _tok_s(state: dict, group: str) -> float | None:
    rates = [r["tokens_per_s"] for k, r in state["runs"].items() if k.rsplit("_s", 1)[0] == group and r["tokens_per_s"]]
    return statistics.mean(rates) if rates else None


def _pct(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f}%"


def findings(state: dict, g: dict) -> list[str]:
    """What the numbers say, stated the same way whichever model they favour."""
    out = []
    ppl = {k: _stats([e["perplexity"] for e in v]) for k, v in g.items()}
    ev = {k: v[0] for k, v in g.items()}

    def versus(a, b):
        pa, pb = ppl[a], ppl[b]
        overlap = not (pa["max"] < pb["min"] or pb["max"] < pa["min"])
        head = (f"{_label(a, state.get('best'))} {pa['mean']:.2f} vs {_label(b, state.get('best'))} {pb['mean']:.2f} "
                f"mean validation perplexity ({_pct(pa['mean'], pb['mean'])})")
        if min(pa["n"], pb["n"]) < 2:
            return head + " (one seed: no spread measured)"
        return (head + f"; the seed ranges {'overlap' if overlap else 'do not overlap'} ({pa['min']:.2f}..{pa['max']:.2f}"
                f" vs {pb['min']:.2f}..{pb['max']:.2f}, {min(pa['n'], pb['n'])} seeds)")
    if "gpt" in g and "mom_deep" in g:
        out.append(f"**Claim 1 (deeper graph, same parameters):** depth {ev['mom_deep']['depth']} vs "
                   f"{ev['gpt']['depth']}, parameters {ev['mom_deep']['parameters']:,} vs {ev['gpt']['parameters']:,}: "
                   + versus("mom_deep", "gpt") + f"; forward FLOPs/token {_pct(ev['mom_deep']['fwd_flops_per_token'], ev['gpt']['fwd_flops_per_token'])}.")
    if "gpt" in g and "mom_shallow" in g:
        a, b = ev["mom_shallow"], ev["gpt"]
        out.append(f"**Claim 3 (shallower, K=2):** depth {a['depth']} vs {b['depth']}: " + versus("mom_shallow", "gpt")
                   + f"; forward FLOPs/token {_pct(a['fwd_flops_per_token'], b['fwd_flops_per_token'])}, activation "
                   f"memory/token {_pct(a['activation_bytes_per_token'], b['activation_bytes_per_token'])} (body "
                   f"without the LM head: {_pct(a.get('body_activation_bytes_per_token', 1), b.get('body_activation_bytes_per_token', 1))}) (paper at "
                   "GPT-2-large scale: 16% fewer TFLOPs, 42-43% less forward memory).")
    best = state.get("best")
    if best and f"{best}_pruned" in g:
        p, base = f"{best}_pruned", best
        line = (f"**Claim 2 (50% of attention, 25% of FFN modules removed from {LABELS[best]}):** parameters "
                f"{ev[base]['parameters']:,} -> {ev[p]['parameters']:,}; " + versus(p, base))
        if f"{p}_recovered" in g:
            st = state["settings"]
            line += (f"; after a recovery run of {st['recover_steps']} steps ({st['recover_steps'] / st['steps']:.0%} more "
                     "training tokens than the unpruned model had): " + versus(f"{p}_recovered", base))
        out.append(line + ".")
    return out


def _figures(state: dict, work: str, img_dir: str) -> list[tuple[str, str]]:
    from mom_dist.report import compare, figures
    from mom_dist.report.run_data import ReportError, load_run

    os.makedirs(img_dir, exist_ok=True)
    drawn = []
    runs: dict[str, list] = {}
    for key, r in state["runs"].items():
        group = key.rsplit("_s", 1)[0]
        try:
            runs.setdefault(_label(group, state.get("best")) if group in LABELS else f"{group}", []).append(
                load_run(r["run_dir"]))
        except ReportError:
            continue
    if runs:
        fig = compare.fig_compare_curves(runs)
        fig.savefig(os.path.join(img_dir, "curves.png"))
        drawn.append(("Validation loss and perplexity during training (every seed; thick: mean)", "curves.png"))
    g = _groups(state)
    if g:
        fig = compare.fig_compare_bars({_label(k, state.get("best")): [e["perplexity"] for e in v] for k, v in g.items()},
                                       "validation perplexity", "Validation perplexity (bar: mean; dots: seeds)")
        fig.savefig(os.path.join(img_dir, "perplexity.png"))
        drawn.append(("Validation perplexity per model (bar: mean, whisker: min..max, dots: seeds)", "perplexity.png"))
    for name in ("mom_deep", "mom_shallow"):
        key = f"{name}_s1"
        if key in state["runs"]:
            run = load_run(state["runs"][key]["run_dir"])
            fig = figures.fig_load_heatmaps(run.routing[-1:], 0) if run.routing else None
            if fig is not None:
                fig.savefig(os.path.join(img_dir, f"load_{name}.png"))
                drawn.append((f"{LABELS[name]}, seed 1: module load per routing step at the end of training",
                              f"load_{name}.png"))
    return drawn


def write(path: str, state: dict, work: str, seconds: float) -> None:
    s, data = state["settings"], state["data"]
    g = _groups(state)
    img_dir = os.path.splitext(path)[0]
    figs = _figures(state, work, img_dir)
    n_main = 3 * len(s["seeds"])
    done = sum(1 for k in state["evals"] if k.rsplit("_s", 1)[0] in LABELS)
    status = "complete" if state.get("finished") else f"in progress ({done} of {n_main} training runs evaluated)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shown = {k: os.path.relpath(v, root) if k in ("work", "results") and v and os.path.abspath(v).startswith(root + os.sep)
             else v for k, v in state["args"].items()}
    args = " ".join(f"--{k} {v}" if v is not True else f"--{k}" for k, v in shown.items()
                    if v not in (None, False) and not (k == "scale" and v == 1) and not (k == "precision" and v == "fp32"))
    tokens_per_run = s["steps"] * s["batch"] * s["seq"]
    summ = data["summary"]
    L = ["# Small-scale study of the paper's claims (issue 14, item 3)", "",
         f"Made by `.venv/bin/python benchmarks/paper_study.py{(' ' + args) if args else ''}`; status: **{status}**; "
         f"started {state['started']}" + (f", finished {state['finished']}" if state.get("finished") else "")
         + f"; {seconds / 3600:.2f} h in this launch of the script (earlier launches' work is reused).", "",
         f"Machine: {state['machine']}.", ""]
    if state["args"].get("smoke"):
        L += ["**Smoke run**: toy sizes and a few steps, to check every stage end to end; its numbers say nothing "
              "about the paper's claims.", ""]
    L += ["## Setup", "",
          f"Corpus ({data['corpus']['mb']:.1f} MB of text, {data['corpus']['documents']:,} documents, nothing downloaded):", "",
          "| source | documents | MB |", "|---|---:|---:|"]
    L += [f"| {p['source']} | {p['documents']:,} | {p['mb']:.2f} |" for p in data["corpus"]["sources"]]
    L += ["", f"Tokenized by `mom-preprocess` (SentencePiece BPE, vocabulary {s['vocab']}, 1% of documents to "
          f"validation): {_fmt(summ.get('train_tokens'))} training and {_fmt(summ.get('valid_tokens'))} validation "
          "tokens.", "",
          f"Budget: every run {s['steps']:,} optimizer steps x {s['batch']} sequences x {s['seq']} tokens = "
          f"{tokens_per_run / 1e6:.2f}M tokens (recovery: {s['recover_steps']} steps); AdamW lr 2e-3, warmup 5%, "
          f"cosine to 10%, weight decay 0.1, clip 1.0, {s['precision']}; seeds {s['seeds']}. Perplexity: every "
          f"non-overlapping {s['seq']}-token window of the validation data"
          f"{'' if s['eval_batches'] is None else ' (first ' + str(s['eval_batches']) + ' batches)'}.", "",
          "## Results", "",
          "| model | parameters | depth | validation perplexity (mean ± std) | min..max | seeds | train tokens/s | "
          "forward MFLOPs/token | activations KB/token | of which body (no LM head) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, evs in g.items():
        st = _stats([e["perplexity"] for e in evs])
        e0 = evs[0]
        tok = _tok_s(state, key) if key in LABELS else None
        L.append(f"| {_label(key, state.get('best'))} | {e0['parameters']:,} | {e0['depth']} | {st['mean']:.2f} ± "
                 f"{st['std']:.2f} | {st['min']:.2f}..{st['max']:.2f} | {st['n']} | "
                 f"{'-' if tok is None else f'{tok:,.0f}'} | {e0['fwd_flops_per_token'] / 1e6:.2f} | "
                 f"{e0['activation_bytes_per_token'] / 1024:.1f} | "
                 f"{e0.get('body_activation_bytes_per_token', float('nan')) / 1024:.1f} |")
    L += ["", "Depth: modules on a token's path (bottom + routing steps + top; SKIP picks counted as steps). "
          "FLOPs: `torch.utils.flop_counter` on a no-grad forward of one validation batch: every matmul the "
          "implementation runs, as routed (SKIP costs nothing), routers, the LM head, the full S x S attention "
          "scores of the math kernel and the one-hot gathers of per-module LayerNorm/bias vectors included. Activations: bytes autograd keeps for backward in a training "
          "forward (saved-tensor hooks, parameters excluded, fp32). Tokens/s: median over the logged intervals "
          "of each run (after the first), averaged over seeds; pruned models are not retrained at full length."]
    f = findings(state, g)
    if f:
        L += ["", "## What the numbers show", ""] + [f"- {x}" for x in f]
    if state.get("prune"):
        L += ["", "Modules kept per pruned model (`mom-prune --attn-keep 0.5 --ffn-keep 0.75`, usage measured on "
              "training text; tables in WORK/pruned/*/prune_table.json):", ""]
        for seed, p in sorted(state["prune"].items()):
            L.append(f"- seed {seed}: kept {p['table']['kept']}" + "".join(f"; {n}" for n in p["table"]["notes"]))
    if figs:
        L += ["", "## Figures", ""]
        rel = os.path.basename(img_dir)
        L += [f"{title}:\n\n![{title}]({rel}/{fname})\n" for title, fname in figs]
    L += ["", "## Why this budget", "", BUDGET_NOTE.format(tokens=tokens_per_run / 1e6)]
    times = [(k, r["seconds_this_launch"]) for k, r in state["runs"].items()]
    if times:
        L += ["", f"Wall time of the training launches (mom-train processes, start-up and final evaluation "
              f"included; a run resumed after an interruption shows its last launch): "
              f"{sum(t for _, t in times) / 3600:.2f} h in all; corpus {data.get('corpus_seconds', 0) / 60:.1f} min, "
              f"tokenizer and tokenization {data.get('seconds', 0) / 60:.1f} min; per run: "
              + ", ".join(f"{k} {t / 60:.1f} min" for k, t in times) + "."]
    with open(path + ".tmp", "w") as fh:
        fh.write("\n".join(L) + "\n")
    os.replace(path + ".tmp", path)


def _fmt(n) -> str:
    return f"{n / 1e6:.2f}M" if isinstance(n, (int, float)) else "?"


BUDGET_NOTE = (
    "The study must finish in under 3 hours on an otherwise idle 2-core CPU machine: 9 training runs "
    "(3 models x 3 seeds), 3 prunings and 3 recovery runs of a tenth of the length, plus the corpus, "
    "the tokenizer and the evaluations. Measured before choosing (mom-train on this 2-core VM, CPU time "
    "per 2,048-token step with one thread, divided by the 1.2x that the VM's load at the time added to "
    "a reference step of benchmarks/model_step.py whose idle time is known): GPT 0.47 s, MoM deep "
    "0.71 s, MoM shallow 0.45 s, i.e. about 5.1 s per step of the budget over all runs and seeds "
    "(recovery included). 1,200 steps: about 1.7 h of training plus about 15 min of corpus, "
    "tokenizer, evaluations and process start-ups, about 2 h in all, leaving a third for error in "
    "the estimate (the run times below replace it). Width 128 with 4 heads and a 4,096-token "
    "vocabulary makes models of about 1.7M parameters (0.5M of them the embedding) whose steps are "
    "not dominated by per-operation overhead; the MoM deep costs the most per token (10 module steps "
    "for the GPT's 6, plus routers and dispatch) and sets the shared budget of {tokens:.2f}M tokens "
    "per run. That is about 1.4 tokens per parameter, far below the ~20 of compute-optimal training: "
    "these are comparisons early in training, at a scale 100-1000x below the paper's (124M-774M "
    "parameters, billions of tokens). The corpus holds more tokens than one run uses, so no run sees "
    "a document twice.")
