"""Eager vs ``torch.compile`` training step of a MoM on CPU (issue 16): does ``train.compile`` pay here?

For each model width (default d 64, 256, 512) and precision (fp32, bf16 autocast) it builds one
MoM, compiles a copy through ``mom_dist.model.compile.compile_model`` (the ``train.compile``
path: inductor) and times training steps (forward + backward + AdamW) of both, round-robin, so
that load from other processes spreads evenly. Reported per row:

  compile s      the first compiled step (Dynamo + AOTAutograd + inductor + C++ build), with an
                 empty inductor cache (a fresh ``TORCHINDUCTOR_CACHE_DIR`` per run of this script)
  warm-cache s   the first step again after ``torch._dynamo.reset()``: what a restarted job
                 pays when inductor's on-disk cache already holds the graphs
  eager / compiled step s   medians over the timed rounds (min..max in the markdown)
  speed-up       eager median / compiled median, and from the minima (steps that other
                 processes' load slowed the least: the steadier figure on a shared machine)
  break-even     steps after which compiling has paid for itself: compile s / (eager - compiled)
  graphs, breaks, recompiles   Dynamo's counters (``compile_stats``), after all steps
  loss diff      first step, |compiled - eager| (same weights and batch)
  load           the machine's 1-minute load average when the row finished (2 cores)

Run (about 10 minutes on 2 idle cores with the defaults; the table is rewritten after each row):
    python benchmarks/compile_step.py                          # -> benchmarks/results/compile.md
    python benchmarks/compile_step.py --widths 64 --rounds 3   # one quick row
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # cold compiles: nothing from an earlier run
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mom_compile_bench_")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _machine  # noqa: E402
from mom_dist.model import ModelConfig, MoMModel, RouterConfig  # noqa: E402
from mom_dist.model.compile import compile_model, compile_stats, reset_compiler  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile.md")


def config(args, d: int) -> ModelConfig:
    router = dict(kind="gru", dim=min(256, d), top_k=1, temperature=0.2)
    return ModelConfig(vocab_size=args.vocab, max_seq_len=args.seq, d_model=d, n_heads=max(1, d // 64),
                       n_bottom=args.bottom, n_top=args.top, n_attn_modules=args.modules, n_ffn_modules=args.modules,
                       n_steps=args.steps, attn_router=RouterConfig(**router),
                       ffn_router=RouterConfig(**dict(router, top_k=args.ffn_k)))


def train_step(model, opt, ids, labels, bf16: bool) -> tuple[float, float]:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(ids, labels)
    out.loss.backward()
    opt.step()
    return time.perf_counter() - t0, out.loss.item()


def measure(args, d: int, bf16: bool) -> dict:
    cfg = config(args, d)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen) for _ in range(4)]
    batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in batches]
    torch.manual_seed(0)
    eager = MoMModel(cfg).train()
    compiled = MoMModel(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (eager, compiled)]
    reset_compiler()
    compile_model(compiled)
    t_compile, loss_c = train_step(compiled, opts[1], *batches[0], bf16)
    _, loss_e = train_step(eager, opts[0], *batches[0], bf16)
    times = {"eager": [], "compiled": []}
    for r in range(args.warmup + args.rounds):  # round-robin: one step of each per round
        for (name, model), opt in zip((("eager", eager), ("compiled", compiled)), opts):
            dt, _ = train_step(model, opt, *batches[(r + 1) % len(batches)], bf16)
            if r >= args.warmup:
                times[name].append(dt)
    stats = compile_stats()
    # A restarted job: same graphs, in-memory caches gone, inductor's on-disk cache warm.
    reset_compiler()
    again = MoMModel(cfg).train()
    compile_model(again)
    t_warm, _ = train_step(again, torch.optim.AdamW(again.parameters(), lr=1e-4), *batches[0], bf16)
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return dict(d=d, precision="bf16 autocast" if bf16 else "fp32", params=eager.num_parameters(), compile=t_compile,
                warm=t_warm, eager=e, compiled=c, e_range=(min(times["eager"]), max(times["eager"])),
                c_range=(min(times["compiled"]), max(times["compiled"])), stats=stats, loss_diff=abs(loss_c - loss_e),
                load=os.getloadavg()[0])


def row(r: dict) -> str:
    s = r["stats"]
    gain = r["eager"] - r["compiled"]
    even = f"{r['compile'] / gain:,.0f}" if gain > 0 else "never"
    return (f"| {r['d']} | {r['precision']} | {r['params'] / 1e6:.1f}M | {r['compile']:.1f} | {r['warm']:.1f} | "
            f"{r['eager']:.3f} ({r['e_range'][0]:.3f}..{r['e_range'][1]:.3f}) | "
            f"{r['compiled']:.3f} ({r['c_range'][0]:.3f}..{r['c_range'][1]:.3f}) | {r['eager'] / r['compiled']:.2f}x | "
            f"{r['e_range'][0] / r['c_range'][0]:.2f}x | {even} | {s['graphs']} | {s['graph_breaks']} | "
            f"{s['recompiles']} | {r['loss_diff']:.1e} | {r['load']:.1f} |")


def write(args, rows: list[str], done: bool, load: str) -> str:
    text = "\n".join([
        "# Eager vs torch.compile training step on CPU (`benchmarks/compile_step.py`)" + ("" if done else " (PARTIAL)"),
        "",
        _machine.describe() + f"; {torch.get_num_threads()} threads; load average before: {load}",
        "",
        f"Model: B={args.bottom} bottom + 1 chunk (N_A = N_F = {args.modules}, H={args.steps} routing steps, GRU "
        f"routers, K=1 attention / K={args.ffn_k} FFN, dropless, grouped GEMM) + T={args.top} top; vocab "
        f"{args.vocab}, seq {args.seq}, batch {args.batch} ({args.batch * args.seq} tokens/step); AdamW eager. "
        f"{args.warmup} warm-up + {args.rounds} timed rounds, round-robin. Compiled: "
        "`mom_dist.model.compile.compile_model` (inductor), what `train.compile=on` runs.",
        "",
        "| d | precision | params | compile s (cold cache) | compile s (warm cache) | eager step s (min..max) "
        "| compiled step s (min..max) | speed-up (medians) | speed-up (minima) | break-even steps | graphs | breaks "
        "| recompiles | first-step loss diff | load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows, "",
        "break-even steps = compile s (cold cache) / (eager - compiled median step time): after that many "
        "training steps compiling has paid for itself (\"never\": the compiled step is not faster).", ""])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--bottom", type=int, default=2)
    ap.add_argument("--top", type=int, default=1)
    ap.add_argument("--modules", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="routing steps H (compile time grows with it)")
    ap.add_argument("--ffn-k", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = []
    for d in args.widths:
        for p in args.precisions:
            print(f"[compile_step] d {d} {p} ...", file=sys.stderr, flush=True)
            rows.append(row(measure(args, d, p == "bf16")))
            write(args, rows, False, load)
    print(write(args, rows, True, load))


if __name__ == "__main__":
    main()
