"""Benchmark of ``mom-finetune`` (issue 10): a tiny fine-tuning run at EP1 and EP2.

For a classification task (GLUE SST-2 layout) and a summarisation task (XSUM layout) on
generated data, a tiny MoM (d 64, 4+4 modules, H 4, GRU routers) is fine-tuned on the DeepSpeed
engine (ZeRO 1, fp32) in real processes (gloo on 127.0.0.1, one process per rank,
OMP_NUM_THREADS=1): EP1 = one process, EP2 = two processes with expert parallelism 2 (each holds
half of every pool). Reported per layout: steady-state optimizer steps/s (mean over the logged
windows after the first), wall time of the whole run (engine start, training, gathering the
plain model, evaluation), peak RSS per rank, parameters held per rank, and the task metrics
(which must agree across layouts). No timed assertions: this only reports.

Run:  .venv/bin/python benchmarks/finetune.py [--steps 60]     (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mom_dist.parallel import local_launch  # noqa: E402
import _machine  # noqa: E402

WORKER = os.path.join(ROOT, "benchmarks", "_finetune_worker.py")
WORDS = "red blue green cat dog tree house river stone cloud bird fish lamp road door book".split()
MODEL = dict(vocab_size=512, max_seq_len=128, d_model=64, n_heads=4, n_bottom=1, n_top=1, n_chunks=1,
             n_attn_modules=4, n_ffn_modules=4, n_steps=4, balance_coef=0.01, z_loss_coef=0.001)
LOG_INTERVAL = 10


def setup(tmp: str) -> str:
    """A tokenizer, a randomly initialised exported MoM and generated task files under ``tmp``."""
    import torch

    from mom_dist.checkpoint.exported import save_exported
    from mom_dist.data.tokenizer import train_tokenizer
    from mom_dist.model import ModelConfig, MoMModel, RouterConfig

    rng = random.Random(0)
    train_tokenizer([" ".join(rng.choice(WORDS + ["good", "bad"]) for _ in range(40)) for _ in range(400)],
                    os.path.join(tmp, "tok"), vocab_size=400)
    r = RouterConfig(kind="gru", dim=32, top_k=1, temperature=0.2)
    cfg = ModelConfig(**MODEL, attn_router=r, ffn_router=RouterConfig(kind="gru", dim=32, top_k=2, temperature=0.2))
    torch.manual_seed(0)
    src = os.path.join(tmp, "model")
    save_exported(src, cfg, MoMModel(cfg).state_dict())
    shutil.copy(os.path.join(tmp, "tok.model"), os.path.join(src, "tokenizer.model"))

    def rows_cls(n):
        out = []
        for _ in range(n):
            label = rng.randrange(2)
            words = [rng.choice(WORDS) for _ in range(rng.randrange(8, 20))]
            words.insert(rng.randrange(len(words) + 1), "good" if label else "bad")
            out.append({"sentence": " ".join(words), "label": label})
        return out

    def rows_sum(n):
        out = []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randrange(20, 40))]
            out.append({"document": " ".join(words), "summary": " ".join(words[:4])})
        return out

    for name, rows in (("cls_train", rows_cls(2000)), ("cls_dev", rows_cls(200)), ("sum_train", rows_sum(2000)),
                       ("sum_dev", rows_sum(64))):
        with open(os.path.join(tmp, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = setup(tmp)
        cases = [("sst2", dict(train_file=f"{tmp}/cls_train.jsonl", eval_file=f"{tmp}/cls_dev.jsonl")),
                 ("xsum", dict(train_file=f"{tmp}/sum_train.jsonl", eval_file=f"{tmp}/sum_dev.jsonl",
                               max_target_len=8, max_new_tokens=8, eval_batch_size=16))]
        rows = ["| task | layout | ranks | steps/s | run wall s | peak RSS MiB / rank | params held / rank | "
                "params total | metrics |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for preset, task in cases:
            for ep in (1, 2):
                overrides = [f"train.steps={args.steps}", "train.seq_len=64", "train.global_batch_size=16",
                             "train.micro_batch_size=8", "train.lr=2e-3", "train.warmup_steps=10",
                             f"train.log_interval={LOG_INTERVAL}", f"parallel.ep_size={ep}", "parallel.zero_stage=1"]
                a = dict(source=src, preset=preset, task=task, out=f"{tmp}/{preset}_ep{ep}", overrides=overrides,
                         log_interval=LOG_INTERVAL)
                res = local_launch.run_ranks(WORKER, "run", ep, a, tmp, timeout=1200)
                r0 = res[0]
                metrics = ", ".join(f"{k} {v:.3f}" for k, v in r0["metrics"].items())
                rss = " / ".join(f"{r['peak_rss_mib']:,.0f}" for r in res)
                rows.append(f"| {preset} | EP{ep} | {ep} | {r0['steps_per_s']:.2f} | {r0['total_s']:.1f} | {rss} | "
                            f"{r0['params_held']:,} | {r0['params_total']:,} | {metrics} |")
        print(f"Machine: {_machine.describe()}")
        print(f"Model: d {MODEL['d_model']}, {MODEL['n_attn_modules']}+{MODEL['n_ffn_modules']} modules, H "
              f"{MODEL['n_steps']}; seq 64, micro-batch 8, global batch 16, {args.steps} steps, fp32, ZeRO 1\n")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
