"""Benchmark of one single-process CPU training step of a MoM against dense GPTs (issue 2).

Measures, for the same model width and the same activated FLOPs per token:
  - tokens/s and achieved FLOP/s of forward + backward + grad clip + AdamW step,
  - FLOP-normalised efficiency = achieved FLOP/s of the model / achieved FLOP/s of a plain
    dense GPT (target >= 0.95),
  - host syncs (ops that would block a GPU's host thread) per training step, counted with
    ``mom_dist.host_sync.count_host_syncs`` (target <= 2 per routing step).

Variants (all share d_model, heads, sequence, batch, vocabulary):
  dense-plain-L   a plain stack of ``layers.Block`` written here (no MoM code at all): the
                  reference whose FLOP/s defines efficiency 1.0.
  gpt2-mom-L      the same dense GPT expressed as a MoM (``gpt2_config``: diagonal schedule).
  mom-K{k}-{path} the MoM: B bottom + 1 chunk of N_A = N_F = 4 modules run for H steps + T top,
                  top-K routing, dispatch through ``torch._grouped_mm`` ("on"), a loop over
                  slices ("off"), or fixed-capacity buffers ("cap1.25").

Useful FLOPs per token (forward + backward = 3 x forward) count matmuls and the causal
attention core only: 6 x (activated matmul weights) + 6 x S x D per attention core + the tied
LM head. Router FLOPs (GRU cell and head) are MoM overhead and are not credited; pairs dropped
by capacity are not credited either. Capacity buffers' padding rows are computed but not
credited. Routers here may not pick SKIP, so every token activates exactly K modules per step.
A second efficiency column credits the router FLOPs as work done: it isolates what dispatch,
grouping and combine cost from what the GRU routers (spec §4, r=256) cost by their size alone.

Timing: all variants are built up front and timed round-robin (one step of each per round)
so that load from other processes on the machine spreads evenly over them; the table gives
the median over rounds and the min..max spread. Efficiency is given from the medians (the
issue's measure) and from the minima (less sensitive to other processes' load, which only
ever adds time). "efficiency" = (useful FLOPs / step time) / the same for the dense reference.

Run:  .venv/bin/python benchmarks/model_step.py            (defaults: about 3 minutes, 2 cores)
      .venv/bin/python benchmarks/model_step.py --help
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# run from a checkout without installing the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from mom_dist.host_sync import count_host_syncs  # noqa: E402
from mom_dist.model import ModelConfig, MoMModel, RouterConfig, gpt2_config  # noqa: E402
from mom_dist.model.dispatch import LocalDispatcher  # noqa: E402
from mom_dist.model.layers import Block, init_gpt2_  # noqa: E402

AUTHORS_SYNCS = 160  # issue 2: the release loops over modules, one host sync each per pass


class DenseGPT(nn.Module):
    """Plain GPT-2: embeddings -> L pre-LN blocks -> ln_f -> tied head. No routing code."""

    def __init__(self, vocab: int, seq: int, d: int, heads: int, n_layers: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList([Block(d, heads, 1e-5, 0.0) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d)
        init_gpt2_(self, 0.02, n_layers)

    def forward(self, ids_BS: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        B, S = ids_BS.shape
        x = self.wte(ids_BS) + self.wpe(torch.arange(S).expand(B, S))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels_BS.reshape(-1))


@dataclass
class Variant:
    name: str
    model: nn.Module
    useful_flops_per_token: float  # nominal; FLOPs of capacity-dropped pairs are subtracted
    routing_steps: int  # n_chunks * n_steps (0 for dense)
    router_flops_per_token: float  # overhead: computed but not credited
    reference: str  # name of the dense variant its efficiency is measured against
    opt: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    credited: list[float] = field(default_factory=list)  # fraction of nominal flops actually done
    syncs: Counter = field(default_factory=Counter)


def dense_layer_flops(d: int, seq: int) -> float:
    """Forward+backward FLOPs per token of one GPT-2 block: 6 x 12 d^2 weights + causal core.

    Causal core forward: QK^T and AV over on average S/2 keys, 2 x 2 x (S/2) x d = 2 S d;
    backward is twice that -> 6 S d.
    """
    return 6 * 12 * d * d + 6 * seq * d


def mom_step_flops(d: int, seq: int, k: int) -> float:
    """One routing step, K modules per token: K x (QKV 3d^2 + out d^2 + FFN 8d^2), one core."""
    return 6 * k * 12 * d * d + 6 * seq * d


def head_flops(d: int, vocab: int) -> float:
    return 6 * d * vocab


def router_flops(cfg: ModelConfig) -> float:
    """Forward+backward FLOPs per token of all routers over all routing steps (not credited)."""
    total = 0.0
    for r in (cfg.attn_router, cfg.ffn_router):
        if r.kind == "gru":  # input and hidden projections to 3 gates, then the class head
            per = cfg.d_model * 3 * r.dim + r.dim * 3 * r.dim + r.dim * cfg.n_classes
        else:
            per = cfg.d_model * r.dim + r.dim * cfg.n_classes
        total += 6 * per
    return total * cfg.n_chunks * cfg.n_steps


def mom_config(args, k: int, grouped: str) -> ModelConfig:
    router = dict(kind="gru", dim=args.router_dim, top_k=k, allow_skip=False)
    return ModelConfig(vocab_size=args.vocab, max_seq_len=args.seq, d_model=args.d_model, n_heads=args.heads,
                       n_bottom=args.bottom, n_top=args.top, n_chunks=1, n_attn_modules=args.modules,
                       n_ffn_modules=args.modules, n_steps=args.steps, attn_router=RouterConfig(**router),
                       ffn_router=RouterConfig(**router), grouped_gemm=grouped)


def build_variants(args) -> list[Variant]:
    d, S, V = args.d_model, args.seq, args.vocab
    L1 = args.bottom + args.steps + args.top  # dense depth with K=1's activated FLOPs
    L2 = args.bottom + 2 * args.steps + args.top  # closest dense depth to K=2's activated FLOPs
    dense = lambda L: L * dense_layer_flops(d, S) + head_flops(d, V)  # noqa: E731
    mom = lambda k: ((args.bottom + args.top) * dense_layer_flops(d, S)  # noqa: E731
                     + args.steps * mom_step_flops(d, S, k) + head_flops(d, V))
    out = []

    def add(name, model, flops, steps, ref):
        rflops = router_flops(model.cfg) if isinstance(model, MoMModel) else 0.0
        out.append(Variant(name, model, flops, steps, rflops, ref))

    torch.manual_seed(0)
    add(f"dense-plain-{L1}", DenseGPT(V, S, d, args.heads, L1), dense(L1), 0, f"dense-plain-{L1}")
    add(f"gpt2-mom-{L1}", MoMModel(gpt2_config(d, args.heads, L1, vocab_size=V, max_seq_len=S,
                                                grouped_gemm="on")), dense(L1), L1, f"dense-plain-{L1}")
    for k in (1,) if args.skip_k2 else (1, 2):
        ref = f"dense-plain-{L1}"
        if k == 2:  # K=2 doubles the module matmuls (not the attention core): compare with dense L2
            ref = f"dense-plain-{L2}"
            add(ref, DenseGPT(V, S, d, args.heads, L2), dense(L2), 0, ref)
        for path in ("on", "off", "cap1.25"):
            model = MoMModel(mom_config(args, k, "off" if path == "off" else "on"))
            if path.startswith("cap"):
                for chunk in model.chunks:
                    chunk.dispatcher = LocalDispatcher(capacity_factor=float(path[3:]))
            add(f"mom-K{k}-{path}", model, mom(k), args.steps, ref)
    for v in out:
        # fused AdamW keeps its step counters on the device: no .item() per parameter (foreach
        # AdamW reads CPU step counters, which would count here but are not GPU syncs).
        v.opt = torch.optim.AdamW(v.model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-5,
                                  weight_decay=0.1, fused=True)
    return out


def train_step(v: Variant, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """forward + backward + clip + AdamW step; returns the FLOPs lost to capacity drops (a
    device tensor, read by the caller outside the timed region) or None for a dense model."""
    v.opt.zero_grad(set_to_none=True)
    lost = None
    if isinstance(v.model, DenseGPT):
        loss = v.model(ids, labels)
    else:
        out = v.model(ids, labels)
        loss = out.loss
        d = v.model.cfg.d_model
        # a dropped attention pair loses QKV + out (4d^2 weights), an FFN pair 8d^2; x6 fwd+bwd
        lost = sum(r.dropped * 6 * (4 if r.pool == "attn" else 8) * d * d for r in out.routing)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(v.model.parameters(), 1.0)
    v.opt.step()
    return lost


def time_all(variants: list[Variant], args) -> None:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    for r in range(args.warmup + args.rounds):
        line = []
        for v in variants:
            t0 = time.perf_counter()
            lost = train_step(v, ids, labels)
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                v.times.append(dt)
                total = v.useful_flops_per_token * args.batch * args.seq
                v.credited.append(1.0 - (float(lost) / total if lost is not None else 0.0))
            line.append(f"{v.name} {dt:.2f}s")
        tag = " (warmup)" if r < args.warmup else ""
        print(f"  round {r + 1}/{args.warmup + args.rounds}{tag}: " + ", ".join(line), flush=True)
    for v in variants:  # one counted step each, after timing (the counter slows dispatch)
        with count_host_syncs() as counter:
            train_step(v, ids, labels)
        v.syncs = counter.ops


def table(variants: list[Variant], args) -> str:
    T = args.batch * args.seq
    rate = {}
    rows = ["| variant | step s median | min..max | tokens/s | useful GFLOP/tok | router GFLOP/tok "
            "| achieved GFLOP/s | efficiency (median) | efficiency (min) | eff., router credited "
            "| host syncs/step | per routing step |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:  # references come first in the list
        med, best = statistics.median(v.times), min(v.times)
        useful = v.useful_flops_per_token * T * statistics.median(v.credited)
        rate[v.name] = (useful / med, useful / best)
        eff = rate[v.name][0] / rate[v.reference][0]
        eff_min = rate[v.name][1] / rate[v.reference][1]
        eff_r = (useful + v.router_flops_per_token * T) / med / rate[v.reference][0]
        per = f"{v.syncs.total() / v.routing_steps:.2f}" if v.routing_steps else "-"
        ref = "" if v.reference == v.name else f" (vs {v.reference.replace('dense-plain-', 'dense-')})"
        rows.append(f"| {v.name} | {med:.3f} | {best:.2f}..{max(v.times):.2f} | {T / med:,.0f} | "
                    f"{v.useful_flops_per_token * 1e-9:.4f} | {v.router_flops_per_token * 1e-9:.4f} | "
                    f"{rate[v.name][0] * 1e-9:.1f} | {eff:.3f}{ref} | {eff_min:.3f} | {eff_r:.3f} | "
                    f"{v.syncs.total()} | {per} |")
    rows.append("")
    rows.append("Host-sync breakdown per training step (op: count):")
    rows.append("")
    for v in variants:
        ops = ", ".join(f"`{k}`: {n}" for k, n in sorted(v.syncs.items())) or "none"
        rows.append(f"- {v.name}: {ops}")
    drops = [v for v in variants if v.name.endswith("cap1.25")]
    if drops:
        rows.append("")
        rows.append("Capacity mode, share of nominal module FLOPs computed (rest dropped): "
                    + ", ".join(f"{v.name} {statistics.median(v.credited):.3f}" for v in drops))
    rows.append("")
    rows.append(f"Authors' release for comparison (issue 2): one host sync per module per pass, {AUTHORS_SYNCS} per "
                f"training step for 1 chunk x 8 steps x (4+4) modules ({AUTHORS_SYNCS // 8} per routing step).")
    return "\n".join(rows)


def settings(args) -> str:
    return (f"{_machine.describe()}, threads {torch.get_num_threads()}\n"
            f"d_model {args.d_model}, heads {args.heads}, seq {args.seq}, batch {args.batch} "
            f"({args.batch * args.seq} tokens/step), vocab {args.vocab}, fp32; MoM: B={args.bottom}, T={args.top}, "
            f"C=1, N_A=N_F={args.modules}, H={args.steps}, GRU routers dim {args.router_dim}, no SKIP; "
            f"AdamW(fused) + clip 1.0; warmup {args.warmup} rounds, {args.rounds} timed rounds")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--bottom", type=int, default=2)
    p.add_argument("--top", type=int, default=1)
    p.add_argument("--modules", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--router-dim", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-k2", action="store_true", help="K=1 only (quicker)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # this process only

    load0 = os.getloadavg()
    variants = build_variants(args)
    print(f"timing {len(variants)} variants round-robin ...", flush=True)
    time_all(variants, args)
    load1 = os.getloadavg()
    print()
    print(settings(args))
    print(f"load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
          f"at end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}")
    print()
    print(table(variants, args))


if __name__ == "__main__":
    main()
