"""A small-scale study of the paper's three claims (issue 14, item 3), one command end to end.

    .venv/bin/python benchmarks/paper_study.py                  # the full study (CPU, 2 cores: see the results)
    .venv/bin/python benchmarks/paper_study.py --smoke          # every stage at toy size, a few minutes
    .venv/bin/python benchmarks/paper_study.py --scale 4 --precision bf16 --work runs/study_gpu   # a GPU

On one corpus and one token budget per run, with --seeds seeds each (default 3), it trains
  gpt          a vanilla GPT of L=6 layers (the spec §7 special case, no routing);
  mom_deep     a MoM with the same pool of parameters (1 bottom + 4 attention / 4 FFN modules +
               1 top block) run for H=8 routing steps: a computation graph of depth 10 (claim 1);
  mom_shallow  the same pools, H=2 steps with K=2 modules per step: depth 4 (claim 3);
then prunes the MoM with the lower mean validation perplexity with ``mom-prune`` (50% of the
attention and 25% of the FFN modules removed, usage measured on training text) and evaluates it
without and with a short recovery run (``train.init_from``; claim 2). It reports validation
perplexity (mean, std and min..max over seeds), training tokens/s, forward FLOPs per token and
the activation memory a training forward keeps for backward, in the results file with plots drawn
by ``mom_dist.report``. This is evidence, not a test: nothing asserts which model wins.

Everything lives under --work (default runs/paper_study) and is reused: the corpus, the data,
every finished run (``study.json`` in its directory), every evaluation. A run interrupted
mid-training resumes from its last checkpoint (mom-train's own resume), so a study killed at any
point continues where it stopped when the same command is run again. The results file is
rewritten after every stage, with what is known so far.

The corpus is built offline from what this machine ships (``build_corpus``): the CPython
documentation topics (the embedded default corpus's source, each topic once), the standard
library's docstrings, plain-text files under /usr/share/doc and man pages rendered with man(1),
exact duplicates dropped; its size and sources are stated in the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _machine  # noqa: E402
import _study_corpus as study_corpus  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "paper_study.md")


def model_configs(d: int, n_heads: int, router_dim: int, vocab: int, seq: int) -> dict:
    """The three models at width d (same parameter pool: 6 blocks' worth of attention + FFN)."""
    base = dict(vocab_size=vocab, max_seq_len=seq, d_model=d, n_heads=n_heads, n_chunks=1, z_loss_coef=0.001)
    fixed = dict(kind="mlp", dim=8, top_k=1, allow_skip=False, schedule="diagonal", weighting="renorm")
    gru = dict(kind="gru", dim=router_dim, temperature=0.2)
    return {
        "gpt": dict(base, n_bottom=0, n_top=0, n_attn_modules=6, n_ffn_modules=6, n_steps=6, balance_coef=0.0,
                    z_loss_coef=0.0, attn_router=fixed, ffn_router=fixed),
        "mom_deep": dict(base, n_bottom=1, n_top=1, n_attn_modules=4, n_ffn_modules=4, n_steps=8,
                         attn_router=dict(gru, top_k=1), ffn_router=dict(gru, top_k=1)),
        "mom_shallow": dict(base, n_bottom=1, n_top=1, n_attn_modules=4, n_ffn_modules=4, n_steps=2,
                            attn_router=dict(gru, top_k=2), ffn_router=dict(gru, top_k=2)),
    }


def settings(args) -> dict:
    """Sizes and budget. Full study (scale 1): d 128, 4 heads, vocab 4096, 128-token sequences,
    16 per step, 1,200 steps = 2.46M tokens per run (why: the results file's "Why this budget")."""
    if args.smoke:
        s = dict(d=32, heads=2, router_dim=8, vocab=512, seq=64, batch=8, steps=12, recover_steps=4,
                 corpus=dict(man_mb=0.3, doc_mb=0.3, python_mb=0.5), eval_batches=4, prune_batches=2)
    else:
        s = dict(d=128, heads=4, router_dim=32, vocab=4096, seq=128, batch=16, steps=1200, recover_steps=120,
                 corpus=dict(man_mb=24.0, doc_mb=12.0, python_mb=4.0), eval_batches=None, prune_batches=16)
    sc = args.scale
    s.update(d=s["d"] * sc, heads=s["heads"] * sc, router_dim=s["router_dim"] * sc, batch=s["batch"] * sc)
    if args.steps:
        s["steps"], s["recover_steps"] = args.steps, max(1, args.steps // 10)
    s["seeds"] = list(range(1, (args.seeds or (2 if args.smoke else 3)) + 1))
    s["precision"] = args.precision
    return s


# ----------------------------------------------------------------------------- cached stages
def cached(path: str, fn):
    """fn()'s JSON result, computed once: a finished stage is never redone."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    value = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)
    return value


def prepare_data(work: str, s: dict) -> dict:
    def make():
        from mom_dist.data.preprocess import preprocess

        t0 = time.time()
        corpus = study_corpus.build_corpus(os.path.join(work, "corpus"), **s["corpus"])
        t = time.time()
        summary = preprocess([corpus["path"]], os.path.join(work, "data", "corpus"), vocab_size=s["vocab"],
                             workers=2, valid_ratio=0.01, overwrite=True, tokenizer_train_mb=16.0)
        return {"corpus": corpus, "prefix": os.path.join(work, "data", "corpus"), "seconds": time.time() - t,
                "corpus_seconds": t - t0,
                "summary": {"documents": summary["documents"], "train_tokens": summary["train"]["tokens"],
                            "valid_tokens": summary["valid"]["tokens"], "tokenizer": summary["tokenizer"]["model"]}}
    data = cached(os.path.join(work, "data.json"), make)
    p = data["prefix"]
    data.update(train=p + "_train_text_document", valid=p + "_valid_text_document", tokenizer=p + "_tokenizer.model")
    return data


def write_config(work: str, name: str, model: dict, s: dict, data: dict, steps: int) -> str:
    import yaml

    every = max(1, steps // 10)
    cfg = {"model": model,
           "train": dict(steps=steps, global_batch_size=s["batch"], micro_batch_size=s["batch"], seq_len=s["seq"],
                         lr=2e-3, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1, log_interval=every,
                         eval_interval=every, eval_batches=8, save_interval=every, keep_last=1,
                         telemetry_interval=every, tensorboard=False, precision=s["precision"]),
           "parallel": {"ep_size": 1, "zero_stage": 1},
           "data": {"train_prefixes": [data["train"]], "valid_prefixes": [data["valid"]],
                    "tokenizer_model": data["tokenizer"]}}
    path = os.path.join(work, "configs", f"{name}.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def train_run(work: str, config: str, name: str, seed: int, extra: list[str] = ()) -> dict:
    """mom-train in its own process; a run directory left by an interrupted study resumes."""
    out = os.path.join(work, "runs", f"{name}_s{seed}")

    def run():
        cmd = [sys.executable, "-m", "mom_dist.cli.train", "--config", config, "--set", f"train.seed={seed}",
               "--set", f"train.out_dir={out}"] + [a for e in extra for a in ("--set", e)]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("OMP_NUM_THREADS", "2")
        t = time.time()
        log = os.path.join(work, "runs", f"{name}_s{seed}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "a") as f:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"paper_study: {name} seed {seed} failed (exit {proc.returncode}); see {log}")
        rates = [r["tokens_per_s"] for r in _records(out, "train")][1:]  # the first interval holds start-up
        return {"run_dir": out, "seconds_this_launch": time.time() - t,
                "tokens_per_s": statistics.median(rates) if rates else None}
    print(f"paper_study: {name} seed {seed}", flush=True)
    return cached(os.path.join(out, "study.json"), run)


def _records(run_dir: str, kind: str) -> list[dict]:
    from mom_dist.report.run_data import load_run

    run = load_run(run_dir)
    return {"train": run.train, "valid": run.valid, "routing": run.routing}[kind]


def evaluate(work: str, source: str, key: str, data: dict, s: dict) -> dict:
    """Validation perplexity (non-overlapping windows of the training length, the same for every
    model) and the forward cost of ``source``."""
    def run():
        from mom_dist.checkpoint.sources import load_source
        from mom_dist.evaluate.perplexity import check_data_for_model, perplexity

        import torch

        model, tok = load_source(source)
        eod = check_data_for_model(data["valid"], model.cfg.vocab_size, tok or data["tokenizer"])
        res = perplexity(model, data["valid"], seq_len=s["seq"], batch_size=s["batch"],
                         max_batches=s["eval_batches"], eod=eod, device="cuda" if torch.cuda.is_available() else "cpu")
        return dict(res, **forward_cost(model.cpu(), data["valid"], s), parameters=model.num_parameters(),
                    depth=model.cfg.depth)
    return cached(os.path.join(work, "eval", f"{key}.json"), run)


def forward_cost(model, prefix: str, s: dict) -> dict:
    """Forward FLOPs per token and activation bytes per token kept for backward, measured on one
    validation batch: a measurement of the trained models, beside ``mom-plan --compare``'s analytic
    figures (``mom_dist.plan.efficiency``, checked against the same two measurements in its tests).

    FLOPs: torch.utils.flop_counter on a no-grad forward, with the math attention kernel and the
    loop matmul path (the counter has no formula for CPU flash attention or torch._grouped_mm;
    both compute the same numbers). Memory: every tensor autograd saves during a training forward
    (saved-tensor hooks), each storage counted once, parameters excluded; fp32 here."""
    import copy

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mom_dist.evaluate.perplexity import read_tokens
    from mom_dist.model import MoMModel

    cfg = copy.deepcopy(model.cfg)
    cfg.grouped_gemm = "off"
    m = MoMModel(cfg)
    m.load_state_dict(model.state_dict())
    tokens = read_tokens(prefix)
    S, B = s["seq"], min(s["batch"], 8)
    x = torch.stack([tokens[i * S:(i + 1) * S + 1] for i in range(B)])
    n_tokens = B * S
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as counter:
        m.eval()(x[:, :-1])
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t
    m.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x[:, :-1], x[:, 1:])
    total = sum(seen.values())
    seen.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the body alone: no LM head, no loss
        m(x[:, :-1], hidden_only=True)
    return {"fwd_flops_per_token": counter.get_total_flops() / n_tokens,
            "activation_bytes_per_token": total / n_tokens, "body_activation_bytes_per_token": sum(seen.values()) / n_tokens}


def prune_and_recover(work: str, best: str, seed: int, data: dict, s: dict, config: str) -> dict:
    from mom_dist.cli.prune import main as mom_prune

    out = os.path.join(work, "pruned", f"{best}_s{seed}")
    run_dir = os.path.join(work, "runs", f"{best}_s{seed}")
    if not os.path.exists(os.path.join(out, "prune_table.json")):
        code = mom_prune([run_dir, "-o", out, "--attn-keep", "0.5", "--ffn-keep", "0.75", "--data", data["train"],
                          "--seq-len", str(s["seq"]), "--batch-size", str(s["batch"]), "--max-batches",
                          str(s["prune_batches"]), "--no-progress", "--overwrite"])
        if code != 0:
            raise SystemExit(f"paper_study: mom-prune failed on {run_dir} (exit {code})")
    with open(os.path.join(out, "prune_table.json")) as f:
        table = json.load(f)
    rec = train_run(work, config, f"{best}_pruned_recovered", seed,
                    [f"train.init_from={out}"] + table["recovery_overrides"])
    return {"pruned_dir": out, "recovered_dir": rec["run_dir"], "recover_tokens_per_s": rec["tokens_per_s"],
            "table": {k: table[k] for k in ("kept", "n_attn_modules", "n_ffn_modules", "parameters", "notes")}}


# ----------------------------------------------------------------------------- the study
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--work", default=None, help="work directory (default runs/paper_study, --smoke: runs/paper_study_smoke)")
    ap.add_argument("--results", default=None, help=f"results file (default {os.path.relpath(RESULTS, ROOT)}; "
                    "--smoke: WORK/paper_study.md)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, 2 seeds, a few steps: checks every stage")
    ap.add_argument("--scale", type=int, default=1, help="multiplies width (d, heads, router dim) and batch: GPUs")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (recovery: a tenth)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args(argv)
    work = os.path.abspath(args.work or os.path.join(ROOT, "runs", "paper_study_smoke" if args.smoke else "paper_study"))
    results = args.results or (os.path.join(work, "paper_study.md") if args.smoke else RESULTS)
    s = settings(args)
    os.makedirs(work, exist_ok=True)
    cached(os.path.join(work, "settings.json"), lambda: s)  # the first launch's settings
    with open(os.path.join(work, "settings.json")) as f:
        if json.load(f) != json.loads(json.dumps(s)):
            raise SystemExit(f"paper_study: {work} holds a study made with other settings; pass another --work")
    import _study_report as study_report

    started = time.time()
    state = {"args": vars(args), "settings": s, "machine": _machine.describe(), "runs": {}, "evals": {},
             "prune": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    data = prepare_data(work, s)
    state["data"] = data
    models = model_configs(s["d"], s["heads"], s["router_dim"], s["vocab"], s["seq"])
    configs = {name: write_config(work, name, m, s, data, s["steps"]) for name, m in models.items()}
    for seed in s["seeds"]:  # seed-major: after one round every model has a first number
        for name in models:
            state["runs"][f"{name}_s{seed}"] = train_run(work, configs[name], name, seed)
            state["evals"][f"{name}_s{seed}"] = evaluate(work, state["runs"][f"{name}_s{seed}"]["run_dir"],
                                                         f"{name}_s{seed}", data, s)
            study_report.write(results, state, work, time.time() - started)
    best = min(("mom_deep", "mom_shallow"),
               key=lambda n: statistics.mean(state["evals"][f"{n}_s{sd}"]["loss"] for sd in s["seeds"]))
    state["best"] = best
    recover_cfg = write_config(work, f"{best}_recover", models[best], s, data, s["recover_steps"])
    for seed in s["seeds"]:
        p = prune_and_recover(work, best, seed, data, s, recover_cfg)
        state["prune"][seed] = p
        state["evals"][f"{best}_pruned_s{seed}"] = evaluate(work, p["pruned_dir"], f"{best}_pruned_s{seed}", data, s)
        state["evals"][f"{best}_pruned_recovered_s{seed}"] = evaluate(
            work, p["recovered_dir"], f"{best}_pruned_recovered_s{seed}", data, s)
        study_report.write(results, state, work, time.time() - started)
    state["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    study_report.write(results, state, work, time.time() - started)
    print(f"paper_study: done in {(time.time() - started) / 60:.1f} min; results in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
