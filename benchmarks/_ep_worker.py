"""Per-rank measurements for ``benchmarks/expert_parallel.py`` (issue 3), run in real gloo processes.

    python benchmarks/_ep_worker.py <function> '<json args>' <result.json>

with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set by the launcher (one process per
rank, like ``tests/dist_utils.run_workers``). Every function returns a JSON-able dict of this
rank's numbers; the launcher aggregates them into tables. Nothing here asserts on timings.

Functions:
  a2a_bytes   all-to-all bytes per routing step: the dispatcher's own ``bytes_sent``, every byte
              that ``all_to_all_single`` put on the wire (payload vs control, forward vs
              backward), and the theoretical minimum recomputed here from the routing ids.
  memory      per-rank parameter / fp32 master / AdamW state bytes as the DeepSpeed engine
              holds them, for each (EP, ZeRO) layout, next to the analytical formula.
  host_syncs  host-sync ops (and host-data tensor constructions) per routing step of a
              training forward + backward through the all-to-all dispatcher.
  step_time   DeepSpeed training step time, EP=1 vs EP=2, timed round-robin.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mom_dist.config import Config, ParallelConfig, TrainConfig  # noqa: E402
from mom_dist.host_sync import count_host_syncs  # noqa: E402
from mom_dist.model import ModelConfig, MoMModel, RouterConfig  # noqa: E402
from mom_dist.model.dispatch import capacity_for  # noqa: E402
from mom_dist.parallel import deepspeed_engine  # noqa: E402
from mom_dist.parallel.dims import build_parallel_dims  # noqa: E402
from mom_dist.parallel.expert_parallel import apply_expert_parallel  # noqa: E402
from mom_dist.parallel.local_launch import worker_main  # noqa: E402
from mom_dist.train.rank_stats import held_bytes  # noqa: E402  (shared with mom-train's rank stats)


# ----------------------------------------------------------------------------- shared helpers
def model_config(m: dict, k_attn: int, k_ffn: int, **extra) -> ModelConfig:
    router = dict(kind="gru", dim=m["router_dim"], temperature=m.get("temperature", 0.2))
    return ModelConfig(vocab_size=m["vocab"], max_seq_len=m["seq"], d_model=m["d_model"], n_heads=m["heads"],
                       n_bottom=m["bottom"], n_top=m["top"], n_chunks=m.get("chunks", 1),
                       n_attn_modules=m["modules"], n_ffn_modules=m["modules"], n_steps=m["steps"],
                       attn_router=RouterConfig(top_k=k_attn, **router), ffn_router=RouterConfig(top_k=k_ffn, **router),
                       **extra)


def batch(m: dict, n_seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m["vocab"], (n_seq, m["seq"]), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


class A2AMeter:
    """Wraps ``torch.distributed.all_to_all_single`` (looked up at call time by
    ``mom_dist.parallel.all_to_all``) and adds up the bytes each call sends to *other* ranks,
    split by phase (set by the caller) and kind: floating point = payload, integer/bool = control
    (split counts, pair metadata, capacity valid masks)."""

    def __init__(self):
        self.bytes = Counter()
        self.calls = Counter()
        self.seconds = 0.0  # wall time inside the calls (includes waiting for slower ranks)
        self.phase = "fwd"
        self._orig = None

    def __enter__(self):
        self._orig = dist.all_to_all_single
        orig = self._orig

        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            n = dist.get_world_size(group)
            me = dist.get_rank(group)
            rows = input.shape[0]
            splits = input_split_sizes if input_split_sizes is not None else [rows // n] * n
            row_bytes = (input[0].numel() if rows else 0) * input.element_size()
            kind = "payload" if input.is_floating_point() else "control"
            self.bytes[(self.phase, kind)] += (rows - splits[me]) * row_bytes
            self.calls[(self.phase, kind)] += 1
            t0 = time.perf_counter()
            work = orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
            self.seconds += time.perf_counter() - t0
            return work

        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._orig


def dropless_min_elems(ids_TK: torch.Tensor, n_modules: int, ep: int, ep_rank: int, d: int, pool: str,
                       qkv_weighted: bool) -> tuple[int, int, int]:
    """Minimum elements a source rank must send for one dropless plan, from its routing ids.

    U = distinct (token, remote rank) pairs, Wp = (token, module) picks on remote ranks (SKIP
    never travels). Attention: the mixed QKV needs x out (D) and QKV back (3D) per U, the output
    projection attn out (D) and O back (D) per U, plus one pick weight per Wp (its pairs are
    summed, weighted, on the expert rank before the single row comes back) and, if the QKV mix
    is weighted, another weight per Wp. FFN: x out (D) and FFN back (D) per U, one weight per Wp.
    Returns (elements, U, Wp, Wl) with Wl the picks of modules on this rank (nothing to send).
    """
    n_local = n_modules // ep
    flat = ids_TK.reshape(ids_TK.shape[0], -1)
    real = flat < n_modules
    dst = torch.where(real, flat // n_local, ep_rank)
    remote = real & (dst != ep_rank)
    wp = int(remote.sum())
    wl = int((real & (dst == ep_rank)).sum())
    pairs = {(t, int(r)) for t, row in enumerate(dst.tolist()) for j, r in enumerate(row) if remote[t, j]}
    u = len(pairs)
    if pool == "attn":
        elems = u * (4 * d + 2 * d) + wp * (2 if qkv_weighted else 1)
    else:
        elems = u * 2 * d + wp
    return elems, u, wp, wl * (2 if pool == "attn" and qkv_weighted else 1)


def capacity_real_pairs(ids_TK: torch.Tensor, n_modules: int, ep: int, ep_rank: int, cap: int):
    """Capacity rule recomputed here: module m keeps the first ``cap`` picks of it in token order.
    Returns (kept pairs to remote ranks, dropped pairs, all non-SKIP pairs)."""
    n_local = n_modules // ep
    seen = Counter()
    kept_remote = dropped = real = 0
    for m in ids_TK.reshape(-1).tolist():
        if m >= n_modules:
            continue
        real += 1
        seen[m] += 1
        if seen[m] > cap:
            dropped += 1
        elif m // n_local != ep_rank:
            kept_remote += 1
    return kept_remote, dropped, real


# ----------------------------------------------------------------------------- a2a bytes
def a2a_bytes(args: dict) -> dict:
    m = args["model"]
    d = m["d_model"]
    out = {}
    for case in args["cases"]:
        ep, k, cf, ac = case["ep"], case["k"], case.get("cf"), case.get("ac", False)
        dims = build_parallel_dims(ep)
        torch.manual_seed(0)  # same initial weights on every rank
        model = MoMModel(model_config(m, k, k, activation_checkpointing=ac))
        apply_expert_parallel(model, dims, cf)
        model.train()
        ids, labels = batch(m, m["batch"], 1000 + dims.rank)  # every rank routes its own tokens
        disps = [c.dispatcher for c in model.chunks]
        with A2AMeter() as meter:
            res = model(ids, labels)
            meter.phase = "bwd"
            res.loss.backward()
        fwd_sent = sum(dp.bytes_sent for dp in disps)  # forward only (plus recompute, if AC)
        esize = torch.finfo(torch.float32).bits // 8
        n = m["modules"]
        mins = real_bytes = dropped = real_pairs = u_tot = wp_tot = own_w = 0
        for rec in res.routing:
            ids_tk = rec.ids_TK
            row = 6 * d if rec.pool == "attn" else 2 * d  # elements a pair moves, both ways
            elems, u, wp, wl = dropless_min_elems(ids_tk, n, ep, dims.ep_rank, d, rec.pool, model.cfg.qkv_weighted)
            mins += elems * esize
            u_tot, wp_tot = u_tot + u, wp_tot + wp
            own_w += wl * esize  # weights of this rank's own pairs (they never leave it)
            if cf is not None:
                cap = capacity_for(ids_tk.shape[0], ids_tk.shape[1], n, cf)
                kr, dr, rp = capacity_real_pairs(ids_tk, n, ep, dims.ep_rank, cap)
                real_bytes += kr * row * esize
                dropped, real_pairs = dropped + dr, real_pairs + rp
            else:
                real_pairs += int((ids_tk < n).sum())
        out[case["name"]] = dict(
            routing_steps=m.get("chunks", 1) * m["steps"], tokens=ids.numel(), bytes_sent=fwd_sent,
            wire_fwd_payload=meter.bytes[("fwd", "payload")], wire_fwd_control=meter.bytes[("fwd", "control")],
            wire_bwd_payload=meter.bytes[("bwd", "payload")], wire_bwd_control=meter.bytes[("bwd", "control")],
            calls_fwd=sum(v for (ph, _), v in meter.calls.items() if ph == "fwd"),
            calls_bwd=sum(v for (ph, _), v in meter.calls.items() if ph == "bwd"),
            min_bytes=mins, real_pair_bytes=real_bytes, dropped=dropped, real_pairs=real_pairs,
            u=u_tot, wp=wp_tot, own_weight_bytes=own_w)
        del model, res
    return out


# ----------------------------------------------------------------------------- memory
def memory(args: dict) -> dict:
    m = args["model"]
    world = dist.get_world_size()
    results = {}
    for ep in args["eps"]:
        for zero in args["zeros"]:
            dims = build_parallel_dims(ep)
            mcfg = model_config(m, 1, 1)
            train = TrainConfig(global_batch_size=m["batch"] * world, micro_batch_size=m["batch"], seq_len=m["seq"],
                                steps=10, warmup_steps=1, save_interval=0, precision=args.get("precision", "fp32"))
            cfg = Config(model=mcfg, train=train,
                         parallel=ParallelConfig(ep_size=ep, zero_stage=zero))
            cfg.validate()
            torch.manual_seed(0)
            model = MoMModel(mcfg)
            p_total = model.num_parameters()
            p_module = model.num_parameters(modules_only=True)
            apply_expert_parallel(model, dims)
            engine, _ = deepspeed_engine.initialize(model, cfg, dims)
            ids, labels = batch(m, m["batch"], 7 + dims.rank)
            out = engine(ids, labels)
            engine.backward(out.loss)
            engine.step()  # AdamW states exist after the first step
            held = held_bytes(engine)
            results[f"ep{ep}_z{zero}"] = dict(ep=ep, zero=zero, world=world, p_total=p_total, p_module=p_module,
                                              held=held, optimizer=type(engine.optimizer).__name__)
            if hasattr(engine, "destroy"):
                engine.destroy()
            del engine, model, out
            gc.collect()
    return results


# ----------------------------------------------------------------------------- host syncs
class HostDataCounter(TorchDispatchMode):
    """Counts ``aten.lift_fresh`` of tensors with at least one dimension: a tensor built from a
    host (Python) list, e.g. ``torch.tensor(list, device=dev)``. On CUDA that is a pageable
    host->device copy followed by a stream synchronisation (``non_blocking=False``): it waits
    for every kernel and collective already queued - a host sync the counter in
    ``mom_dist.host_sync`` does not see. 0-dim ones (``x[idx] = True``) are scalars passed to the
    kernel, not copies, and are not counted."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) == "aten.lift_fresh.default" and args[0].dim() > 0:
            self.n += 1
        return func(*args, **(kwargs or {}))


def host_syncs(args: dict) -> dict:
    m = args["model"]
    out = {}
    for case in args["cases"]:
        ep, cf, ac = case["ep"], case.get("cf"), case.get("ac", False)
        dims = build_parallel_dims(ep)
        torch.manual_seed(0)
        model = MoMModel(model_config(m, case["k"], case["k"], activation_checkpointing=ac, grouped_gemm="on"))
        apply_expert_parallel(model, dims, cf)
        model.train()
        ids, labels = batch(m, m["batch"], 50 + dims.rank)
        model(ids, labels).loss.backward()  # warm-up (lazy initialisations)
        model.zero_grad(set_to_none=True)
        with HostDataCounter() as host_data:
            with count_host_syncs() as c_fwd:
                res = model(ids, labels)
            fwd_host_data = host_data.n
            with count_host_syncs() as c_bwd:
                res.loss.backward()
        phases = dict(fwd=dict(c_fwd.ops), bwd=dict(c_bwd.ops), host_data_fwd=fwd_host_data,
                      host_data_bwd=host_data.n - fwd_host_data)
        out[case["name"]] = dict(routing_steps=m.get("chunks", 1) * m["steps"], **phases)
        del model, res
    return out


# ----------------------------------------------------------------------------- step time
def step_time(args: dict) -> dict:
    m = args["model"]
    world = dist.get_world_size()
    engines = {}
    for ep in args["eps"]:
        dims = build_parallel_dims(ep)
        mcfg = model_config(m, m["k_attn"], m["k_ffn"], grouped_gemm="on")
        cfg = Config(model=mcfg, train=TrainConfig(global_batch_size=m["batch"] * world, micro_batch_size=m["batch"],
                                                   seq_len=m["seq"], steps=1000, warmup_steps=1, save_interval=0),
                     parallel=ParallelConfig(ep_size=ep, zero_stage=args["zero"]))
        cfg.validate()
        torch.manual_seed(0)
        model = MoMModel(mcfg)
        apply_expert_parallel(model, dims)
        engines[ep] = deepspeed_engine.initialize(model, cfg, dims)[0]
    ids, labels = batch(m, m["batch"], 300 + dist.get_rank())
    times = {ep: [] for ep in engines}
    a2a = {ep: [] for ep in engines}
    losses = {ep: [] for ep in engines}
    for r in range(args["warmup"] + args["rounds"]):
        for ep, engine in engines.items():  # round-robin: load from other jobs spreads evenly
            dist.barrier()
            with A2AMeter() as meter:
                t0 = time.perf_counter()
                out = engine(ids, labels)
                engine.backward(out.loss)
                engine.step()
                dist.barrier()
                dt = time.perf_counter() - t0
            if r >= args["warmup"]:
                times[ep].append(dt)
                a2a[ep].append(meter.seconds)
                losses[ep].append(float(out.loss))
    return dict(times={str(k): v for k, v in times.items()}, a2a_s={str(k): v for k, v in a2a.items()},
                losses={str(k): v for k, v in losses.items()}, tokens_per_rank=ids.numel())


if __name__ == "__main__":
    worker_main(globals(), threads=1)
