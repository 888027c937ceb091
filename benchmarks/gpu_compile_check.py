"""Short GPU check of ``train.compile`` (issue 16): compiled == eager on one GPU, fp32 and bf16.

Runs the local grouped path (the default: dropless, ``grouped_gemm: auto``) of a mid-size MoM
through ``mom_dist.model.compile.compile_model`` (what ``train.compile=on`` runs: inductor) and
eagerly, with the same weights and batches, for a few training steps whose routing changes:

  fp32            on CUDA ``torch._grouped_mm`` needs bf16, so fp32 takes the loop over module
                  slices, hidden from Dynamo in the ``mom_dist::grouped_mm`` custom op
  bf16 autocast   ``torch._grouped_mm`` traced natively by Dynamo (as measured on the H200:
                  one graph); the custom op must not add a graph break here
  bf16 + capacity fixed-capacity buffers (``LocalDispatcher(1.25)``), bf16 autocast

Per check: loss |compiled - eager| (first step: same weights, same batch), the worst gradient
error relative to the gradient's own max (first step), the routing agreement, Dynamo's graph /
break / recompile counts over all steps, compile time (first step) and median step times of
both (forward + backward + AdamW). PASS: fp32 loss and every gradient within 1e-5 (TF32 off);
bf16 within bf16's precision (loss 2e-2, gradients 5e-2 of their max: a flipped routing pick
is not a kernel error, the agreement column says how many flipped); and 1 graph, 0 breaks.

Every check runs in its own try/except and the table is rewritten to ``$OUT/gpu_compile_check.md``
(and stdout) after each one, so a run cut short keeps what it measured. Budget: about 100-150 s
on one H200 (three compiles of a d 256, 4-routing-step model); ``--budget-s`` skips the checks
that would start after it. DeepSpeed is not needed.

    OUT=/tmp/out python benchmarks/gpu_compile_check.py        # on the GPU machine
    python benchmarks/gpu_compile_check.py --smoke             # tiny sizes on CPU (minutes here: inductor)
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mom_dist.model import ModelConfig, MoMModel, RouterConfig  # noqa: E402
from mom_dist.model.compile import compile_model, compile_stats, reset_compiler  # noqa: E402
from mom_dist.model.dispatch import LocalDispatcher  # noqa: E402

CHECKS = [  # name, bf16 autocast, capacity factor, loss tolerance, gradient tolerance (of the max)
    ("fp32, dropless, grouped auto", False, None, 1e-5, 1e-5),
    ("bf16 autocast, dropless, grouped auto", True, None, 2e-2, 5e-2),
    ("bf16 autocast, capacity 1.25", True, 1.25, 2e-2, 5e-2),
]


def config(args) -> ModelConfig:
    router = dict(kind="gru", dim=args.router_dim, top_k=1, temperature=0.5)
    return ModelConfig(vocab_size=args.vocab, max_seq_len=args.seq, d_model=args.d_model,
                       n_heads=max(1, args.d_model // 64), n_bottom=args.bottom, n_top=1, n_attn_modules=4, n_ffn_modules=4, n_steps=args.steps,
                       attn_router=RouterConfig(**router), ffn_router=RouterConfig(**dict(router, top_k=2)))


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_check(args, dev, bf16: bool, capacity, loss_tol: float, grad_tol: float) -> dict:
    cfg = config(args)
    torch.manual_seed(0)
    with dev:
        eager = MoMModel(cfg).train()
        compiled = MoMModel(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    for m in (eager, compiled):
        for chunk in m.chunks:
            chunk.dispatcher = LocalDispatcher(capacity)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, compiled)]
    reset_compiler()
    compile_model(compiled)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(dev)
               for _ in range(1 + args.steps_timed)]
    res = {"times": {"eager": [], "compiled": []}}
    for i, b in enumerate(batches):
        outs = {}
        for name, model, opt in (("compiled", compiled, opts[1]), ("eager", eager, opts[0])):
            sync(dev)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(b[:, :-1], b[:, 1:])
            out.loss.backward()
            if i == 0:  # first step: same weights and batch -> compare before the update
                outs[name] = (out, {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                                    if p.grad is not None})
            opt.step()
            sync(dev)
            res["times"][name].append(time.perf_counter() - t0)
        if i == 0:
            (oc, gc), (oe, ge) = outs["compiled"], outs["eager"]
            res["loss_diff"] = abs(oc.loss.item() - oe.loss.item())
            res["grad_err"] = max(((gc[n] - ge[n]).abs().max() / ge[n].abs().max().clamp_min(1e-30)).item()
                                  for n in ge)
            res["grads_missing"] = sorted(set(ge) ^ set(gc))
            same = [float((a.ids_TK == b.ids_TK).float().mean()) for a, b in zip(oc.routing, oe.routing)]
            res["routing_equal"] = sum(same) / max(1, len(same))
    res["stats"] = compile_stats()
    s = res["stats"]
    res["pass"] = (res["loss_diff"] <= loss_tol and res["grad_err"] <= grad_tol and not res["grads_missing"]
                   and (s["graphs"], s["graph_breaks"], s["recompiles"]) == (1, 0, 0))
    return res


def fmt(name: str, r: dict) -> str:
    if "error" in r:
        return f"| {name} | ERROR | {r['error']} | | | | | | | | |"
    s, t = r["stats"], r["times"]
    e, c = statistics.median(t["eager"][1:]), statistics.median(t["compiled"][1:])
    return (f"| {name} | {'PASS' if r['pass'] else 'FAIL'} | {r['loss_diff']:.2e} | {r['grad_err']:.2e} | "
            f"{r['routing_equal']:.3f} | {s['graphs']} | {s['graph_breaks']} | {s['recompiles']} | "
            f"{t['compiled'][0]:.1f} | {e * 1e3:.1f} | {c * 1e3:.1f} ({e / c:.2f}x) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU (checks the script)")
    ap.add_argument("--d-model", type=int, default=None, help="default 256 (smoke 32)")
    ap.add_argument("--steps", type=int, default=None, help="routing steps H (default 4; smoke 1)")
    ap.add_argument("--seq", type=int, default=None, help="default 256 (smoke 16)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (smoke 2)")
    ap.add_argument("--steps-timed", type=int, default=None, help="training steps after the first (default 6)")
    ap.add_argument("--budget-s", type=float, default=100.0, help="seconds: checks that would start later are skipped")
    args = ap.parse_args()
    s = args.smoke
    args.d_model = args.d_model or (32 if s else 256)
    args.steps = args.steps or (1 if s else 4)
    args.seq = args.seq or (16 if s else 256)
    args.batch = args.batch or (2 if s else 8)
    args.steps_timed = args.steps_timed or (2 if s else 6)
    args.vocab, args.router_dim, args.bottom = (64, 16, 0) if s else (8192, 128, 1)
    if torch.cuda.is_available():
        dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 check compares real fp32
        torch.backends.cudnn.allow_tf32 = False
        where = torch.cuda.get_device_name(dev)
    elif s:
        dev, where = torch.device("cpu"), "CPU (smoke)"
    else:
        raise SystemExit("no CUDA device: run with --smoke on CPU, or on a GPU machine")
    t_start = time.time()
    rows = []

    def write(final: bool) -> None:
        text = "\n".join([
            f"# gpu_compile_check{' (SMOKE)' if s else ''}{'' if final else ' (PARTIAL)'}", "",
            f"date {datetime.datetime.now().isoformat(timespec='seconds')}, {where}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}; model d {args.d_model}, B={args.bottom} + 1 chunk (N_A=N_F=4, "
            f"H={args.steps}, K=1/2) + T=1, vocab {args.vocab}; seq {args.seq}, batch {args.batch}; "
            f"1 + {args.steps_timed} training steps; total {time.time() - t_start:.0f} s", "",
            "| check | result | loss diff | grad err / max | routing equal | graphs | breaks | recompiles "
            "| compile s | eager step ms | compiled step ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, ""])
        print(text if final else rows[-1], flush=True)
        out = os.environ.get("OUT")
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "gpu_compile_check.md"), "w") as f:
                f.write(text)

    for name, bf16, capacity, loss_tol, grad_tol in CHECKS:
        if time.time() - t_start > args.budget_s:
            rows.append(f"| {name} | SKIPPED: --budget-s {args.budget_s:.0f} spent | | | | | | | | | |")
        else:
            print(f"[gpu_compile_check] {name} ...", file=sys.stderr, flush=True)
            try:
                rows.append(fmt(name, run_check(args, dev, bf16, capacity, loss_tol, grad_tol)))
            except Exception as e:  # noqa: BLE001 - report it and go on with the next check
                traceback.print_exc()
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200].replace("|", "/")
                rows.append(fmt(name, {"error": f"{type(e).__name__}: {msg}"}))
        write(final=False)
    write(final=True)


if __name__ == "__main__":
    main()
