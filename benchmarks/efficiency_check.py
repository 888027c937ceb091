"""The efficiency table's FLOPs and forward memory against measurement, on CPU at small scale.

    python benchmarks/efficiency_check.py            # markdown table: predicted vs measured

For each case (vanilla GPT, MoM K=1 and K=2, with and without SKIP, anchor layers, activation
checkpointing on and off, fp32 and bf16) it builds the model, runs one training forward (loss
included) and backward on random tokens, and compares with ``mom_dist.plan.efficiency``:

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (every matmul; on CPU, where torch has no
  formula for its flash-attention kernel, torch's own SDPA formulas are registered for it);
- forward memory: the bytes the CPU allocator holds after the forward that it did not hold before
  (``torch.profiler`` with ``profile_memory``: every allocation minus every free), i.e. what
  autograd saved, what checkpointing keeps, and the output (logits, routing records).

Routing is forced (``forced_picks``) so that the SKIP share, which sets the work, is known
exactly: each router may pick only K given classes per token and step (its own allowed-class
mask, per token), so ``topk`` picks exactly those. ``tests/plan/test_efficiency.py`` asserts
these comparisons within 2%.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys

import torch
import torch.utils.flop_counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mom_dist.model import ModelConfig, MoMModel, RouterConfig  # noqa: E402
from mom_dist.model.config import gpt2_config  # noqa: E402
from mom_dist.model.router import Router  # noqa: E402
from mom_dist.plan.efficiency import efficiency  # noqa: E402

aten = torch.ops.aten


def flop_counter() -> torch.utils.flop_counter.FlopCounterMode:
    """FlopCounterMode, plus torch's SDPA formulas for the CPU flash kernel and a formula for
    ``_grouped_mm`` (the module pools on GPUs), which torch does not register."""
    fc = torch.utils.flop_counter
    mapping = {
        # x (M, K) @ w (G, K, N) -> (M, N), or the weight gradient x^T (K, M) @ g (M, N) -> (G, K, N):
        # 2 x contracted x output elements of one group
        getattr(aten, "_grouped_mm", None):
            lambda a, b, *args, out_shape=None, **kw: 2 * a[-1] * out_shape[-1] * out_shape[-2],
        getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None):
            lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v),
        getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None):
            lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v),
    }
    mapping = {op: f for op, f in mapping.items() if op is not None}
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


@contextlib.contextmanager
def forced_picks(schedule):
    """Routers may pick only ``schedule(router, step, n_tokens)`` -> (T, C) bool (K True per
    token): their own allowed-class mask, made per token. Everything else runs unchanged."""
    original = Router.allowed
    calls = {}

    def allowed(self, step, device):
        if self.cfg.schedule == "diagonal":  # already fixed: module h at step h
            return original(self, step, device)
        return schedule(self, step, calls[id(self)]["T"]).to(device)

    def forward(self, x_TD, state_TR, step, _orig=Router.forward):
        calls.setdefault(id(self), {})["T"] = x_TD.shape[0]
        return _orig(self, x_TD, state_TR, step)

    Router.allowed, saved_forward = allowed, Router.forward
    Router.forward = forward
    try:
        yield
    finally:
        Router.allowed, Router.forward = original, saved_forward


def rotating(skip_every: int | None):
    """Token t at step h picks classes (t + h + j) mod n, j < K: every module equally often;
    n = N (no SKIP) or N + 1 (class N, SKIP, once every N + 1 picks). ``skip_every=None``: no SKIP."""
    def schedule(router, step, T):
        n = router.n_modules + (1 if skip_every else 0)
        t = torch.arange(T)[:, None]
        picks = (t + step + torch.arange(router.cfg.top_k)[None]) % n  # (T, K)
        mask = torch.zeros(T, router.n_classes, dtype=torch.bool)
        return mask.scatter_(1, picks, True)
    return schedule


def skip_shares(routing, m: ModelConfig) -> tuple[float, float]:
    """Share of picks that were SKIP, per pool, from a forward's routing records."""
    out = []
    for pool, n in (("attn", m.n_attn_modules), ("ffn", m.n_ffn_modules)):
        ids = torch.cat([r.ids_TK.reshape(-1) for r in routing if r.pool == pool])
        out.append((ids >= n).float().mean().item())
    return out[0], out[1]


def measure(m: ModelConfig, batch: int, seq: int, *, precision: str = "fp32", skip: bool = False, seed: int = 0,
            dispatcher=None, memory: bool = True) -> dict:
    """Measured and predicted figures of one case (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(seed)
    model = MoMModel(m).train()
    if precision == "bf16":
        model = model.to(torch.bfloat16)  # DeepSpeed's bf16 mode: bf16 weights and activations
    if dispatcher is not None:
        for chunk in model.chunks:
            chunk.dispatcher = dispatcher
    ids = torch.randint(0, m.vocab_size, (batch, seq))
    with forced_picks(rotating(skip_every=1 if skip else None)):
        counter = flop_counter()
        # Held bytes: every allocation minus every free during the forward (loss included).
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if memory else contextlib.nullcontext()
        with prof, counter:
            out = model(ids, ids)
        fwd_bytes = sum(e.self_cpu_memory_usage for e in prof.key_averages()) if memory else float("nan")
        del prof  # a profiler object left alive skews the next one's count
        fwd_flops = counter.get_total_flops()
        s_a, s_f = skip_shares(out.routing, m)
        counter = flop_counter()
        with counter:
            out.loss.backward()
        bwd_flops = counter.get_total_flops()
    pred = efficiency(m, batch, seq, skip_attn=s_a, skip_ffn=s_f, skip_rows_computed=dispatcher is None)
    tokens = batch * seq
    return dict(fwd_flops=fwd_flops / tokens, train_flops=(fwd_flops + bwd_flops) / tokens,
                fwd_bytes=fwd_bytes, skip_attn=s_a, skip_ffn=s_f,
                pred_fwd_flops=pred.forward_flops.total, pred_train_flops=pred.training_flops.total,
                pred_fwd_bytes=pred.precision(precision).forward_activations)


def tiny(**over) -> ModelConfig:
    """A small MoM (d 64, 4 + 4 modules, 2 steps, GRU routers) with overrides."""
    kw = dict(vocab_size=512, max_seq_len=64, d_model=64, n_heads=4, n_bottom=1, n_top=1, n_chunks=1,
              n_attn_modules=4, n_ffn_modules=4, n_steps=2, attn_router=RouterConfig(kind="gru", dim=32),
              ffn_router=RouterConfig(kind="gru", dim=32), z_loss_coef=0.001, grouped_gemm="off")
    for key in ("attn_router", "ffn_router"):
        if key in over:
            over[key] = RouterConfig(**{"kind": "gru", "dim": 32, **over[key]})
    kw.update(over)
    cfg = ModelConfig(**kw)
    cfg.validate()
    return cfg


def k2(**over):
    return tiny(attn_router=dict(top_k=2), ffn_router=dict(top_k=2), **over)


# name -> (model config, skip forced); each is measured with checkpointing off and on
CASES = {
    "vanilla GPT (MoM special case, L=4)": (gpt2_config(64, 4, 4, vocab_size=512, max_seq_len=64, grouped_gemm="off"),
                                            False),
    "dense GPT (3 blocks + 1 trivial chunk)": (tiny(n_bottom=3, n_top=0, n_attn_modules=1, n_ffn_modules=1, n_steps=1,
                                                    attn_router=dict(kind="mlp", dim=8, allow_skip=False,
                                                                     schedule="diagonal"),
                                                    ffn_router=dict(kind="mlp", dim=8, allow_skip=False,
                                                                    schedule="diagonal")), False),
    "MoM K=1": (tiny(), False),
    "MoM K=1, SKIP": (tiny(), True),
    "MoM K=2": (k2(), False),
    "MoM K=2, SKIP": (k2(), True),
    "MoM K=2, 2 chunks + anchors": (k2(n_chunks=2, anchor=True), False),
    "MoM K=2 renorm, MLP routers": (tiny(attn_router=dict(top_k=2, kind="mlp", weighting="renorm"),
                                         ffn_router=dict(top_k=2, kind="mlp", weighting="renorm")), False),
    "MoM K=1 release (renorm, double softmax)": (tiny(attn_router=dict(weighting="renorm"),
                                                      ffn_router=dict(weighting="renorm"), router_bias=True,
                                                      balance_double_softmax=True, balance_reduction="release"),
                                                 False),
}


@contextlib.contextmanager
def one_rank_all_to_all():
    """The expert-parallel dispatcher on a 1-rank gloo group: it computes only module picks (SKIP
    picks never travel), as every rank of a dropless ep_size > 1 run does."""
    import tempfile

    import torch.distributed as dist

    from mom_dist.parallel.all_to_all import AllToAllDispatcher
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            yield AllToAllDispatcher(dist.group.WORLD, 1, 0)
        finally:
            dist.destroy_process_group()


def with_checkpointing(m: ModelConfig, on: bool) -> ModelConfig:
    m = copy.deepcopy(m)
    m.activation_checkpointing = on
    return m


def device_check(configs: dict, device: str = "cuda", batch: int = 1, seq: int = 1024) -> None:
    """Models on a GPU in bf16: FLOPs (FlopCounterMode) and the device memory a training forward
    leaves allocated, against the prediction (which counts the CPU kernels' saved tensors; the
    fused CUDA GRU cell keeps 2 r less per router step)."""
    name_of = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"\n{name_of}, torch {torch.__version__}, bf16 weights, batch {batch} x {seq}, forced routing, no SKIP\n")
    print(HEADER)
    for name, m in configs.items():
        cfg = copy.deepcopy(m)
        torch.manual_seed(0)
        with torch.device(device):
            model = MoMModel(cfg).to(torch.bfloat16).train()
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
        for ac in (False, True):
            cfg.activation_checkpointing = ac  # the model's blocks and chunks read this config
            with forced_picks(rotating(None)):
                sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
                used = torch.cuda.memory_allocated if device == "cuda" else (lambda: float("nan"))
                sync()
                before = used()
                out = model(ids, ids)
                sync()
                held = used() - before
                del out
                counter = flop_counter()
                with counter:
                    out = model(ids, ids)
                fwd = counter.get_total_flops()
                counter = flop_counter()
                with counter:
                    out.loss.backward()
                bwd = counter.get_total_flops()
                del out
                model.zero_grad(set_to_none=True)
            pred = efficiency(cfg, batch, seq, skip_rows_computed=True)
            r = dict(fwd_flops=fwd / (batch * seq), train_flops=(fwd + bwd) / (batch * seq), fwd_bytes=held,
                     skip_attn=0.0, skip_ffn=0.0, pred_fwd_flops=pred.forward_flops.total,
                     pred_train_flops=pred.training_flops.total, pred_fwd_bytes=pred.bf16.forward_activations)
            print(row(name, ac, "bf16", r), flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    if "--gpu" in sys.argv:  # the paper configs on the GPU machine (python3 benchmarks/efficiency_check.py --gpu)
        from mom_dist.config import load_config
        device_check({name: load_config(os.path.join(ROOT, "configs", "paper", f"{name}.yaml")).model
                      for name in ("gpt2-large", "mom-large-deep", "mom-large-shallow")})
        return
    batch, seq = 2, 64
    print(f"Predicted (`mom_dist.plan.efficiency`) vs measured, CPU, batch {batch} x {seq} tokens, "
          f"torch {torch.__version__}. FLOPs per token; forward memory in KiB.\n")
    print(HEADER)
    for name, (m, skip) in CASES.items():
        for ac in (False, True):
            for precision in ("fp32", "bf16"):
                r = measure(with_checkpointing(m, ac), batch, seq, precision=precision, skip=skip)
                print(row(name, ac, precision, r))
    print("\nSKIP picks cost nothing when only module picks are computed (the all-to-all dispatcher of "
          "ep_size > 1 runs, here on one rank); at ep_size 1 the local dispatcher computes them as padding rows "
          "(rows above). Memory with this dispatcher is an estimate (its send/receive buffers are not modelled).\n")
    print(HEADER)
    with one_rank_all_to_all() as disp:
        for name in ("MoM K=1, SKIP", "MoM K=2, SKIP"):
            m, skip = CASES[name]
            for ac in (False, True):
                r = measure(with_checkpointing(m, ac), batch, seq, skip=skip, dispatcher=disp)
                print(row(name + ", all-to-all dispatch", ac, "fp32", r))


HEADER = ("| case | AC | precision | SKIP attn / ffn | fwd FLOPs pred | measured | diff | train FLOPs pred "
          "| measured | diff | fwd KiB pred | measured | diff |\n"
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def row(name: str, ac: bool, precision: str, r: dict) -> str:
    d = {k: r[f"pred_{k}"] / r[k] - 1 for k in ("fwd_flops", "train_flops", "fwd_bytes")}
    return (f"| {name} | {'on' if ac else 'off'} | {precision} | {r['skip_attn']:.2f} / {r['skip_ffn']:.2f} | "
            f"{r['pred_fwd_flops']:,.0f} | {r['fwd_flops']:,.0f} | {d['fwd_flops']:+.2%} | "
            f"{r['pred_train_flops']:,.0f} | {r['train_flops']:,.0f} | {d['train_flops']:+.2%} | "
            f"{r['pred_fwd_bytes'] / 1024:,.1f} | {r['fwd_bytes'] / 1024:,.1f} | {d['fwd_bytes']:+.2%} |")


if __name__ == "__main__":
    main()
