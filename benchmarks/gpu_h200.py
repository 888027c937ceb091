"""Prepared single-GPU benchmark of MoM-small (issue 3): run it whenever an H200 (or H100) is lent.

What it measures, as markdown tables (to ``$OUT/gpu_h200.md`` when ``$OUT`` is set, and stdout):
  1. bf16 correctness: a MoM-small-size model, forward + backward in fp32 vs (a) bf16 autocast
     over fp32 weights and (b) bf16 weights (what DeepSpeed's bf16 mode trains): loss difference,
     logit error, routing agreement, gradient cosine.
  2. Training throughput of MoM-small (configs/mom-small.yaml dims, seq 1024): tokens/s and MFU
     for grouped GEMM on (and the loop fallback for contrast), activation checkpointing off/on;
     bf16 autocast, fused AdamW, grad clip 1.0.
     MFU = model FLOPs per step / step time / 989e12 (dense bf16 peak of H100/H200 SXM, no
     sparsity). Model FLOPs per token = 6 x activated matmul weights (K modules per routing
     step, tied LM head included) + 6*S*d per causal attention core (half of the S x S scores);
     router FLOPs and activation-checkpointing recompute are NOT credited (standard MFU).
  3. Real device->host syncs per training step (``torch.cuda.set_sync_debug_mode``: counts
     every synchronising CUDA call, including blocking host->device copies that
     ``mom_dist.host_sync`` cannot see) next to the ``count_host_syncs`` count, for the local
     dispatcher and the all-to-all dispatcher on a 1-rank NCCL group (degenerate exchange, but
     the real plan code: count exchange, ``tolist``, metadata, host-built tensors).
  4. One FFN routing step in isolation (plan -> dispatch -> pool -> combine, fwd + bwd) at
     T = micro-batch x 1024 tokens: local grouped, local loop, all-to-all (1 rank).
  5. If ``torch.cuda.device_count() > 1``: NCCL ``all_to_all_single`` bandwidth between the
     visible GPUs (one process per GPU). With one GPU this is skipped (an all-to-all with
     oneself moves nothing).
  6. Compiled (``train.compile``'s path, ``mom_dist.model.compile``) vs eager training steps:
     bf16 with grouped GEMM on and off, and fp32: compile time, step time, Dynamo's graph /
     graph-break / recompile counts, peak memory.

Budget: about 5 minutes on one H200 (sections 1-5 ~20 s, section 6 ~250 s of compiling);
``--budget-s`` bounds section 6. Each section rewrites ``$OUT/gpu_h200.md`` when it ends.
Run on the GPU machine from the repository root (needs torch >= 2.8 with CUDA; DeepSpeed is
not needed):
    OUT=/tmp/out python benchmarks/gpu_h200.py            # full run, writes $OUT/gpu_h200.md
    python benchmarks/gpu_h200.py --smoke                  # tiny sizes, CPU or GPU, ~2 min (section 6 compiles)
Then copy the table into ``benchmarks/results/gpu_h200.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mom_dist.config_utils import load_yaml  # noqa: E402
from mom_dist.host_sync import count_host_syncs  # noqa: E402
from mom_dist.model import ModelConfig, MoMModel, RouterConfig  # noqa: E402
from mom_dist.model.dispatch import LocalDispatcher  # noqa: E402
from mom_dist.model.modules import FFNPool  # noqa: E402

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 tensor-core peak, FLOP/s (no 2:4 sparsity)


# ----------------------------------------------------------------------------- config / FLOPs
def mom_small(args, **over) -> ModelConfig:
    """configs/mom-small.yaml's model section (or tiny sizes for --smoke)."""
    m = dict(load_yaml(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "configs", "mom-small.yaml"))["model"])
    if args.smoke:
        m.update(vocab_size=256, max_seq_len=64, d_model=64, n_heads=4, n_attn_modules=4, n_ffn_modules=4, n_steps=2,
                 attn_router=dict(m["attn_router"], dim=32), ffn_router=dict(m["ffn_router"], dim=32))
    m.update(over)
    m["attn_router"] = RouterConfig(**m["attn_router"])
    m["ffn_router"] = RouterConfig(**m["ffn_router"])
    cfg = ModelConfig(**m)
    cfg.validate()
    return cfg


def model_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    d = cfg.d_model
    dense = cfg.n_bottom + cfg.n_top + cfg.n_chunks * int(cfg.anchor)
    core = 6 * seq * d  # causal QK^T + AV, forward + backward
    k_a, k_f = cfg.attn_router.top_k, cfg.ffn_router.top_k
    routed = cfg.n_chunks * cfg.n_steps * (6 * (k_a * 4 + k_f * 8) * d * d + core)
    # (SKIP picks would lower the activated FLOPs; the counted step reports the actual share)
    return dense * (72 * d * d + core) + routed + 6 * d * cfg.vocab_size


def router_flops_per_token(cfg: ModelConfig) -> float:
    total = 0.0
    for r in (cfg.attn_router, cfg.ffn_router):
        per = cfg.d_model * 3 * r.dim + r.dim * 3 * r.dim + r.dim * cfg.n_classes if r.kind == "gru" else \
            cfg.d_model * r.dim + r.dim * cfg.n_classes
        total += 6 * per
    return total * cfg.n_chunks * cfg.n_steps


def activated_share(routing, cfg: ModelConfig) -> float:
    """Fraction of the nominal K module picks per token and step that were modules (not SKIP)."""
    got = nominal = 0.0
    for r in routing:
        w = 4 if r.pool == "attn" else 8
        got += w * float((r.ids_TK < r.n_modules).sum())
        nominal += w * r.ids_TK.numel()
    return got / max(nominal, 1.0)


def sync_device(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def batch(cfg, n_seq, seq, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (n_seq, seq + 1), generator=g)
    return ids[:, :-1].contiguous().to(dev), ids[:, 1:].contiguous().to(dev)


# ----------------------------------------------------------------------------- 1. bf16 correctness
def bf16_correctness(args, dev) -> str:
    torch.manual_seed(0)
    cfg = mom_small(args, grouped_gemm="on", activation_checkpointing=False)
    with dev:  # initialise on the device: much quicker than on the host for 100M+ parameters
        ref = MoMModel(cfg).train()
    ids, labels = batch(cfg, args.check_batch, args.seq, dev, seed=1)

    def run(model, autocast: bool):
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            out = model(ids, labels)
        out.loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    out32, g32 = run(ref, False)
    rows = ["| variant | loss | loss - fp32 | logits max abs err | logits rel. RMS err | routing picks equal "
            "| grad cosine, modules (min / mean) | grad cosine, other (min / mean) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ref_logits = out32.logits.float()
    rows.append(f"| fp32 | {out32.loss.item():.5f} | 0 | 0 | 0 | 1.000 | 1 / 1 | 1 / 1 |")
    with dev:
        bf16_model = MoMModel(cfg)
    bf16_model.load_state_dict(ref.state_dict())
    bf16_model = bf16_model.to(torch.bfloat16).train()
    variants = (("bf16 autocast, fp32 weights", ref, True), ("bf16 weights (DeepSpeed bf16)", bf16_model, False))
    for name, model, ac in variants:
        out, g = run(model, ac)
        lg = out.logits.float()
        err = (lg - ref_logits)
        rel = (err.square().mean() / ref_logits.square().mean()).sqrt().item()
        same = sum(float((a.ids_TK == b.ids_TK).float().mean()) for a, b in zip(out.routing, out32.routing))
        same /= max(1, len(out.routing))
        cos = {"module": [], "other": []}
        for n, gref in g32.items():
            if n not in g or gref.norm() == 0:
                continue
            c = F.cosine_similarity(g[n].flatten(), gref.flatten(), dim=0).item()
            cos["module" if "_pool." in n else "other"].append(c)
        fmt = lambda v: f"{min(v):.4f} / {statistics.mean(v):.4f}" if v else "-"  # noqa: E731
        rows.append(f"| {name} | {out.loss.item():.5f} | {out.loss.item() - out32.loss.item():+.5f} | "
                    f"{err.abs().max().item():.4f} | {rel:.2e} | {same:.3f} | {fmt(cos['module'])} | "
                    f"{fmt(cos['other'])} |")
    del ref, bf16_model
    return "\n".join(rows)


# ----------------------------------------------------------------------------- 2. throughput
def throughput(args, dev) -> str:
    variants = [("grouped on, AC off", "on", False), ("grouped on, AC on", "on", True)]
    if not args.skip_loop:
        variants.append(("loop fallback, AC off", "off", False))
    S, B = args.seq, args.micro_batch
    rows = ["| variant | step s median | min..max | tokens/s | model TFLOP/s | MFU | router GFLOP/tok (not credited) "
            "| modules activated | peak mem GiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ids, labels = batch(mom_small(args), B, S, dev, seed=2)
    for name, grouped, ac in variants:
        torch.manual_seed(0)
        cfg = mom_small(args, grouped_gemm=grouped, activation_checkpointing=ac)
        with dev:
            model = MoMModel(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                                fused=True)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times, share = [], []
        for i in range(args.warmup + args.steps):
            sync_device(dev)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = model(ids, labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sync_device(dev)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
                share.append(activated_share(out.routing, cfg))
        med = statistics.median(times)
        flops = model_flops_per_token(cfg, S) * B * S  # nominal; scaled by the activated share below
        # SKIP picks lower the module FLOPs actually done: credit only the modules run
        module_part = cfg.n_chunks * cfg.n_steps * 6 * (cfg.attn_router.top_k * 4 + cfg.ffn_router.top_k * 8) \
            * cfg.d_model ** 2 * B * S
        flops -= module_part * (1 - statistics.median(share))
        mem = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else float("nan")
        rows.append(f"| {name} | {med:.4f} | {min(times):.4f}..{max(times):.4f} | {B * S / med:,.0f} | "
                    f"{flops / med / 1e12:.1f} | {flops / med / PEAK_BF16:.3f} | "
                    f"{router_flops_per_token(cfg) * 1e-9:.4f} | {statistics.median(share):.3f} | {mem:.1f} |")
        del model, opt, out
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    cfg = mom_small(args)
    rows += ["", f"Model FLOPs/token (nominal, all picks modules) {model_flops_per_token(cfg, S) / 1e9:.3f} GFLOP; "
                 f"{B} x {S} = {B * S:,} tokens/step; MFU peak {PEAK_BF16 / 1e12:.0f} TFLOP/s dense bf16."]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- 3./4. dispatch paths
def init_one_rank(dev) -> bool:
    """A 1-rank process group (NCCL on GPU, gloo on CPU) for the all-to-all dispatcher."""
    if dist.is_initialized():
        return True
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    try:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1,
                                device_id=dev if dev.type == "cuda" else None)
        return True
    except Exception as e:  # noqa: BLE001 - report, do not fail the whole benchmark
        print(f"[gpu_h200] no 1-rank process group ({e}); skipping the all-to-all dispatcher rows", flush=True)
        return False


def dispatchers(have_pg: bool):
    out = [("local, grouped mm", "on", lambda: LocalDispatcher()), ("local, loop", "off", lambda: LocalDispatcher()),
           ("local, capacity 1.25", "on", lambda: LocalDispatcher(1.25))]
    if have_pg:
        from mom_dist.parallel.all_to_all import AllToAllDispatcher
        out += [("all-to-all dropless (1 rank)", "on", lambda: AllToAllDispatcher(dist.group.WORLD, 1, 0)),
                ("all-to-all capacity 1.25 (1 rank)", "on", lambda: AllToAllDispatcher(dist.group.WORLD, 1, 0, 1.25))]
    return out


@contextlib.contextmanager
def cuda_sync_counter(dev):
    """Counts synchronising CUDA calls via torch's sync debug mode (warn level)."""
    box = {"n": None}
    if dev.type != "cuda":
        yield box
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    box["n"] = len(syncs)
    box["where"] = sorted({f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs})


def sync_counts(args, dev, have_pg: bool) -> str:
    rows = ["| dispatcher | routing steps | `count_host_syncs` (fwd+bwd) | CUDA syncs, fwd+bwd (debug mode) "
            "| per routing step | where (file:line) |",
            "|---|---:|---:|---:|---:|---|"]
    ids, labels = batch(mom_small(args), 2, args.seq, dev, seed=3)
    for name, grouped, make in dispatchers(have_pg):
        torch.manual_seed(0)
        cfg = mom_small(args, grouped_gemm=grouped, activation_checkpointing=False)
        with dev:
            model = MoMModel(cfg).train()
        for chunk in model.chunks:
            chunk.dispatcher = make()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            model(ids, labels).loss.backward()  # warm-up: lazy initialisation syncs are not per step
        sync_device(dev)
        model.zero_grad(set_to_none=True)
        with cuda_sync_counter(dev) as box, count_host_syncs() as counted:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = model(ids, labels)
            out.loss.backward()
        steps = cfg.n_chunks * cfg.n_steps
        n = box["n"]
        cuda = "n/a (CPU)" if n is None else str(n)
        per = "-" if n is None else f"{n / steps:.2f}"
        where = ", ".join(box.get("where", [])[:6]) or "-"
        rows.append(f"| {name} | {steps} | {counted.total} | {cuda} | {per} | {where} |")
        del model, out
    return "\n".join(rows)


def ffn_step(args, dev, have_pg: bool) -> str:
    """One FFN routing step (plan, dispatch, pool FFN, combine; forward + backward), median time."""
    torch.manual_seed(0)
    T = args.micro_batch * args.seq
    rows = ["| dispatcher | K | tokens | fwd+bwd ms median | min | rows/s |", "|---|---:|---:|---:|---:|---:|"]
    for k in (1, 2):
        cfg = mom_small(args, ffn_router=dict(kind="gru", dim=256 if not args.smoke else 32, top_k=k, temperature=0.2))
        g = torch.Generator().manual_seed(k)
        ids_TK = torch.stack([torch.randperm(cfg.n_ffn_modules, generator=g)[:k] for _ in range(T)]).to(dev)
        w_TK = torch.rand(T, k, generator=g).to(dev)
        x = torch.randn(T, cfg.d_model, generator=g).to(dev, torch.bfloat16)
        for name, grouped, make in dispatchers(have_pg):
            with dev:
                pool = FFNPool(cfg.n_ffn_modules, cfg.d_model, cfg.layer_norm_eps, grouped == "on")
            for pname, p in pool.named_parameters():
                if pname.endswith("_weight") and p.dim() == 3:
                    torch.nn.init.normal_(p, std=0.02)
            disp = make()
            times = []
            for i in range(args.warmup + args.steps):
                xx = x.detach().requires_grad_(True)
                sync_device(dev)
                t0 = time.perf_counter()
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    plan = disp.plan(ids_TK, cfg.n_ffn_modules)
                    y = disp.combine(plan, pool.ffn(disp.dispatch(plan, xx), plan.groups), w_TK)
                y.float().square().mean().backward()
                sync_device(dev)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            rows.append(f"| {name} | {k} | {T:,} | {med * 1e3:.2f} | {min(times) * 1e3:.2f} | {T * k / med:,.0f} |")
            del pool
    return "\n".join(rows)


# ----------------------------------------------------------------------------- 6. torch.compile
def compiled_vs_eager(args, dev, deadline: float) -> str:
    """Training-step time of MoM-small, eager vs compiled through ``train.compile``'s path
    (``mom_dist.model.compile.compile_model``: forward + backward compiled in place, optimizer
    eager): bf16 autocast with grouped GEMM on and off, and fp32 (grouped ``auto``: on CUDA fp32
    takes the loop over module slices, inside the ``mom_dist::grouped_mm`` custom op). The first
    compiled step's time is the compile time; graphs, graph breaks and recompiles are Dynamo's
    counters (``compile_stats``). A variant that fails is reported with its error; variants are
    skipped once ``deadline`` (time.time()) has passed."""
    from mom_dist.model.compile import compile_model, compile_stats, reset_compiler

    S, B = args.seq, args.micro_batch
    rows = ["| variant | first step s (compile) | step s median | tokens/s | vs eager | graphs | graph breaks "
            "| recompiles | peak mem GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ids, labels = batch(mom_small(args), B, S, dev, seed=2)
    eager_s = {}
    for precision, grouped in (("bf16", "on"), ("bf16", "off"), ("fp32", "auto")):
        key = f"{precision}, grouped {grouped}"
        for compiled in (False, True):
            name = f"{key}, {'compiled' if compiled else 'eager'}"
            if time.time() > deadline:
                rows.append(f"| {name} | skipped: time budget spent | | | | | | | |")
                continue
            torch.manual_seed(0)
            cfg = mom_small(args, grouped_gemm=grouped, activation_checkpointing=False)
            with dev:
                model = MoMModel(cfg).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
            reset_compiler()
            if compiled:
                compile_model(model)  # in place, as train.compile=on does
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            times = []
            try:
                for i in range(1 + args.warmup + args.steps):
                    sync_device(dev)
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                        out = model(ids, labels)
                    out.loss.backward()
                    opt.step()
                    sync_device(dev)
                    times.append(time.perf_counter() - t0)
                    if time.time() > deadline + 60:
                        raise TimeoutError(f"stopped after {i + 1} steps: time budget spent")
            except Exception as e:  # noqa: BLE001 - the failure is the result
                msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                rows.append(f"| {name} | failed: {type(e).__name__}: {msg} | | | | | | | |")
                del model, opt
                continue
            med = statistics.median(times[1 + args.warmup:])
            if not compiled:
                eager_s[key] = med
            rel = f"{eager_s[key] / med:.2f}x" if compiled and key in eager_s else "1.00x"
            st = compile_stats() if compiled else None
            graphs, breaks, recomp = (st["graphs"], st["graph_breaks"], st["recompiles"]) if st else ("-",) * 3
            mem = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else float("nan")
            rows.append(f"| {name} | {times[0]:.2f} | {med:.4f} | {B * S / med:,.0f} | {rel} | {graphs} | {breaks} "
                        f"| {recomp} | {mem:.1f} |")
            for why, n in sorted((st or {}).get("break_reasons", {}).items(), key=lambda kv: -kv[1])[:3]:
                rows.append(f"| ↳ break x{n} | {why[:150]} | | | | | | | |")
            del model, opt, out
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    rows += ["", "Compiled: `mom_dist.model.compile.compile_model` (what `train.compile=on` runs: inductor, default "
                 "mode, in place); optimizer eager (fused AdamW on GPU); bf16 rows under autocast, fp32 rows without "
                 "TF32; 'first step' includes the compile."]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- 5. NCCL a2a
def _a2a_bw_worker(rank: int, world: int, port: int, sizes_mb: list, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    res = []
    for mb in sizes_mb:
        n = mb * 2 ** 20 // 2  # bf16 elements per rank
        n -= n % world
        x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        for _ in range(3):
            dist.all_to_all_single(y, x)
        torch.cuda.synchronize()
        iters = 10
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_to_all_single(y, x)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / iters
        res.append((mb, dt))
    if rank == 0:
        q.put(res)
    dist.barrier()
    dist.destroy_process_group()


def nccl_bandwidth(args) -> str:
    world = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world < 2:
        return (f"Skipped: {world} GPU visible. An all-to-all needs >= 2 GPUs; with one GPU the EP path is "
                "measured only through the dispatcher rows above (1-rank NCCL group).")
    import socket
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    sizes = [1, 16, 128] if args.smoke else [1, 8, 64, 256]
    mp.spawn(_a2a_bw_worker, args=(world, port, sizes, q), nprocs=world, join=True)
    rows = [f"{world} GPUs, bf16, per-rank buffer size; algbw = buffer / time; busbw = algbw x (n-1)/n (nccl-tests).",
            "", "| MiB per rank | time ms | algbw GB/s | busbw GB/s |", "|---:|---:|---:|---:|"]
    for mb, dt in q.get():
        alg = mb * 2 ** 20 / dt / 1e9
        rows.append(f"| {mb} | {dt * 1e3:.3f} | {alg:.1f} | {alg * (world - 1) / world:.1f} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (runs on CPU), to check the script works")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 1024; smoke 64)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 8; smoke 2)")
    ap.add_argument("--check-batch", type=int, default=None, help="sequences for the bf16 check (default 4)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--skip-loop", action="store_true", help="omit the loop-fallback throughput row")
    ap.add_argument("--skip-compile", action="store_true", help="omit section 6 (torch.compile vs eager)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="wall-clock budget: section 6 skips variants once it is spent (default 420 s)")
    args = ap.parse_args()
    s = args.smoke
    args.seq = args.seq or (64 if s else 1024)
    args.micro_batch = args.micro_batch or (2 if s else 8)
    args.check_batch = args.check_batch or (2 if s else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if s else 3)
    args.steps = args.steps or (2 if s else 10)
    if torch.cuda.is_available():
        dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference is real fp32
        name = torch.cuda.get_device_name(dev)
    else:
        if not s:
            raise SystemExit("no CUDA device: run with --smoke on CPU (tiny sizes), or on a GPU machine")
        dev, name = torch.device("cpu"), "CPU (smoke)"
    t_start = time.time()
    sections = []

    def section(title, fn):
        t = time.time()
        print(f"[gpu_h200] {title} ...", file=sys.stderr, flush=True)
        try:
            body = fn()
        except Exception as e:  # noqa: BLE001 - keep the other sections' results
            import traceback
            body = "FAILED:\n\n```\n" + traceback.format_exc()[-3000:] + "```"
            print(f"[gpu_h200] {title} failed: {e!r}", file=sys.stderr, flush=True)
        sections.append(f"## {title}\n\n{body}\n\n({time.time() - t:.0f} s)")
        write(partial=True)  # what has run so far survives a timeout later on

    def write(partial: bool = False) -> None:
        cfg = mom_small(args)
        head = (f"# gpu_h200 benchmark{' (SMOKE: tiny sizes, numbers meaningless)' if s else ''}"
                f"{' (PARTIAL: still running or stopped early)' if partial else ''}\n\n"
                f"date {datetime.datetime.now().isoformat(timespec='seconds')}, device {name}, "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}; model: d {cfg.d_model}, heads {cfg.n_heads}, "
                f"vocab {cfg.vocab_size}, B={cfg.n_bottom} T={cfg.n_top} C={cfg.n_chunks} N_A={cfg.n_attn_modules} "
                f"N_F={cfg.n_ffn_modules} H={cfg.n_steps}, K={cfg.attn_router.top_k}/{cfg.ffn_router.top_k}, "
                f"GRU r={cfg.attn_router.dim}, {n_params:,} parameters; seq {args.seq}, micro-batch "
                f"{args.micro_batch}; {args.warmup} warm-up + {args.steps} timed steps; "
                f"total {time.time() - t_start:.0f} s\n")
        text = head + "\n" + "\n\n".join(sections) + "\n"
        if not partial:
            print(text)
        out_dir = os.environ.get("OUT")
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "gpu_h200.md"), "w") as f:
                f.write(text)

    with torch.device("meta"):
        n_params = MoMModel(mom_small(args)).num_parameters()
    section("1. bf16 vs fp32 (forward + backward, MoM-small" + (" - smoke sizes)" if s else ")"),
            lambda: bf16_correctness(args, dev))
    section("2. Training throughput and MFU", lambda: throughput(args, dev))
    have_pg = init_one_rank(dev)
    section("3. Host syncs per forward + backward", lambda: sync_counts(args, dev, have_pg))
    section("4. One FFN routing step in isolation", lambda: ffn_step(args, dev, have_pg))
    if dist.is_initialized():
        dist.destroy_process_group()
    section("5. NCCL all_to_all_single bandwidth", lambda: nccl_bandwidth(args))
    if not args.skip_compile:
        section("6. torch.compile vs eager (training step)",
                lambda: compiled_vs_eager(args, dev, t_start + args.budget_s))
    write()

if __name__ == "__main__":
    main()
