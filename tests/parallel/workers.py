"""Worker functions run by ``tests/dist_utils.run_workers`` in real processes (one per rank)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mom_dist.parallel.local_launch import worker_main


def dispatch_parity(args: dict) -> dict:
    """All-to-all dispatcher == local dispatcher on the same routing: outputs and gradients."""
    from mom_dist.model import ModelConfig, MoMModel, RouterConfig
    from mom_dist.parallel.dims import build_parallel_dims
    from mom_dist.parallel.expert_parallel import apply_expert_parallel
    from mom_dist.model.dispatch import LocalDispatcher
    from mom_dist.model.router import RouterOutput

    dims = build_parallel_dims(args["ep"])
    n_a, n_f, k, cf = args["n_a"], args["n_f"], args["k"], args.get("capacity_factor")
    cfg = ModelConfig(vocab_size=50, max_seq_len=16, d_model=16, n_heads=2, n_bottom=0, n_top=0,
                      n_attn_modules=n_a, n_ffn_modules=n_f, n_steps=1, qkv_weighted=args.get("qkv_weighted", False),
                      attn_router=RouterConfig(top_k=k, dim=8), ffn_router=RouterConfig(top_k=k, dim=8))
    torch.manual_seed(0)
    ref_model = MoMModel(cfg)
    ep_model = MoMModel(cfg)
    ep_model.load_state_dict(ref_model.state_dict())
    ref_model.chunks[0].dispatcher = LocalDispatcher(cf)
    apply_expert_parallel(ep_model, dims, cf)
    B, S = 2, 5
    T, C = B * S, cfg.n_classes
    g = torch.Generator().manual_seed(100 + dims.rank)  # each rank routes its own tokens
    x = torch.randn(T, 16, generator=g)

    def ids(n_pool):
        out = torch.stack([torch.randperm(C, generator=g)[:k] for _ in range(T)])
        if args.get("uneven"):  # nothing goes to the last rank's modules from this rank
            out = torch.where(out >= n_pool - n_pool // dims.ep_size, C - 1, out)
        return out

    ra = RouterOutput(None, None, ids(n_a), torch.rand(T, k, generator=g), None)
    rf = RouterOutput(None, None, ids(n_f), torch.rand(T, k, generator=g), None)
    results = {}
    for name, model in (("ref", ref_model), ("ep", ep_model)):
        chunk = model.chunks[0]
        chunk.attn_router.forward = lambda *a, r=ra: r
        chunk.ffn_router.forward = lambda *a, r=rf: r
        xx = x.clone().requires_grad_(True)
        wa, wf = ra.weights_TK.clone().requires_grad_(True), rf.weights_TK.clone().requires_grad_(True)
        ra.weights_TK, rf.weights_TK = wa, wf
        out, _, _, rec_a, rec_f = chunk.routing_step(xx, None, None, 0, (B, S), None, None)
        (out * torch.linspace(-1, 1, 16)).square().sum().backward()
        grads = {n: p.grad.clone() for n, p in chunk.named_parameters() if "pool" in n and p.grad is not None}
        results[name] = dict(out=out.detach(), gx=xx.grad, gwa=wa.grad, gwf=wf.grad, grads=grads,
                             dropped=int(rec_a.dropped) + int(rec_f.dropped))
        ra.weights_TK, rf.weights_TK = wa.detach(), wf.detach()
    # Module gradients: the reference sums every rank's contribution over the EP group.
    worst = 0.0
    diffs = {}
    for key in ("out", "gx", "gwa", "gwf"):
        diffs[key] = (results["ref"][key] - results["ep"][key]).abs().max().item()
        worst = max(worst, diffs[key])
    ep_chunk = ep_model.chunks[0]
    for n, p in ref_model.chunks[0].named_parameters():  # same order on every rank
        if "pool" not in n:
            continue
        ref = results["ref"]["grads"].get(n, torch.zeros_like(p))
        dist.all_reduce(ref, group=dims.ep_group)  # every rank's tokens contribute
        pool = ep_chunk.get_submodule(n.split(".")[0])
        got = results["ep"]["grads"].get(n, torch.zeros_like(pool.get_parameter(n.split(".")[1])))
        diffs[n] = (ref[pool.first:pool.first + pool.n_local] - got).abs().max().item()
        worst = max(worst, diffs[n])
    # Host syncs of a training forward+backward through the EP dispatcher, with activation
    # checkpointing on (recompute must not re-plan): <= 1 per plan dropless, 0 with capacity.
    from mom_dist.host_sync import count_host_syncs

    ep_model.cfg.activation_checkpointing = True
    ep_model.train()
    with count_host_syncs() as syncs:
        out, *_ = ep_chunk.routing_step(x.clone().requires_grad_(True), None, None, 0, (B, S), None, None)
        out.square().sum().backward()
    return dict(max_abs_diff=worst, diffs=diffs, host_syncs=syncs.total, dropped_ref=results["ref"]["dropped"], dropped_ep=results["ep"]["dropped"],
                bytes_sent=ep_chunk.dispatcher.bytes_sent if dims.ep_size > 1 else 0)


def compiled_parity(args: dict) -> dict:
    """torch.compile (``args["backend"]``) == eager through the all-to-all dispatcher, on steps
    whose routing (and so every split size) changes: losses, gradients of this rank's parameters
    and the all-to-all byte count; plus Dynamo's graph / break / recompile counters."""
    import copy

    from mom_dist.model import ModelConfig, MoMModel, RouterConfig
    from mom_dist.model.compile import compile_model, compile_stats, reset_compiler
    from mom_dist.parallel.dims import build_parallel_dims
    from mom_dist.parallel.expert_parallel import apply_expert_parallel

    dims = build_parallel_dims(2)
    cfg = ModelConfig(vocab_size=48, max_seq_len=8, d_model=16, n_heads=2, n_bottom=0, n_top=0,
                      n_attn_modules=2, n_ffn_modules=4, n_steps=args["n_steps"], activation_checkpointing=True,
                      attn_router=RouterConfig(dim=8, top_k=2, temperature=0.5),
                      ffn_router=RouterConfig(dim=8, top_k=1, temperature=0.5))
    torch.manual_seed(0)
    model = MoMModel(cfg)
    ref = copy.deepcopy(model)
    for m in (model, ref):
        apply_expert_parallel(m, dims, args.get("capacity_factor"))
    reset_compiler()
    compile_model(model, args["backend"])
    gen = torch.Generator().manual_seed(10 + dims.rank)  # each rank routes its own tokens
    worst, splits, sent = 0.0, set(), []
    for i in range(args["steps"]):
        ids = torch.randint(0, 48, (2, 8), generator=gen)
        res = []
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
            for c in m.chunks:
                c.dispatcher.bytes_sent = 0
            out = m(ids, ids)
            out.loss.backward()
            res.append((out.loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None},
                        sum(c.dispatcher.bytes_sent for c in m.chunks)))
        (loss, grads, b), (loss_ref, grads_ref, b_ref) = res
        assert grads.keys() == grads_ref.keys() and len(grads) == len(list(ref.parameters()))
        diffs = [(grads[n] - grads_ref[n]).abs().max().item() for n in grads]
        worst = max([worst, (loss - loss_ref).abs().item()] + diffs)
        sent.append([b, b_ref])
        splits.add(tuple(torch.bincount(out.routing[-1].ids_TK.flatten(), minlength=5).tolist()))
        if i == 0:
            warm = compile_stats()
    return dict(max_abs_diff=worst, bytes=sent, distinct_loads=len(splits), warm=warm, stats=compile_stats())


def _global_params(model, dims) -> dict:
    """This rank's parameters under single-process names; a pool's stacked tensors are split
    into one entry per module, named by its global id (``...qkv_weight[3]``)."""
    from mom_dist.parallel.deepspeed_engine import plain_state_key

    out = {}
    for name, p in model.named_parameters():
        name = plain_state_key(name)
        head, pname = name.rsplit(".", 1)
        if head.endswith("_pool"):
            first = model.get_submodule(head).first
            for i in range(p.shape[0]):
                out[f"{name}[{first + i}]"] = p.detach()[i].float().clone()
        else:
            out[name] = p.detach().float().clone()
    return out


def train_layouts(args: dict) -> dict:
    """Train each (ep, zero, overrides) layout in turn in this process group; record per-step
    losses and dump final parameters (single-process names) for the test to compare."""
    from mom_dist.config import load_config
    from mom_dist.parallel.dims import build_parallel_dims
    from mom_dist.train.trainer import train

    rank = dist.get_rank()
    results = {}
    for run in args["runs"]:
        overrides = args["base"] + run["overrides"] + [f"parallel.ep_size={run['ep']}",
                                                       f"parallel.zero_stage={run['zero']}"]
        cfg = load_config(args["config"], overrides)
        res = train(cfg, log=lambda *a: None)
        dims = build_parallel_dims(run["ep"])
        torch.save(_global_params(res.engine.module, dims), os.path.join(args["dump"], f"{run['name']}_rank{rank}.pt"))
        results[run["name"]] = {"losses": res.losses, "valid": res.valid_loss}
        del res
    return results


def train_chain(args: dict) -> dict:
    """Train each run of ``args["runs"]`` in turn in this process group. A run may first take a
    checkpoint of an earlier run (``copy_from: [out_dir, tag]``, copied by rank 0 into its own
    out_dir as ``latest``; ``legacy: true`` strips the format mark, as earlier versions wrote
    it). Records losses, log lines or the error, and dumps final parameters."""
    import json
    import shutil

    from mom_dist.config import load_config
    from mom_dist.parallel.dims import build_parallel_dims
    from mom_dist.train.trainer import train

    rank = dist.get_rank()
    results = {}
    for run in args["runs"]:
        out = os.path.join(args["dump"], run["name"])
        if run.get("copy_from") and rank == 0:
            src, tag = run["copy_from"]
            shutil.copytree(os.path.join(args["dump"], src, "checkpoints", tag), os.path.join(out, "checkpoints", tag))
            with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
                f.write(tag)
            if run.get("legacy"):
                state_file = os.path.join(out, "checkpoints", tag, "mom_state.json")
                state = json.load(open(state_file))
                for key in ("format", "files", "state_xxh3_64"):  # what those versions did not write
                    del state[key]
                json.dump(state, open(state_file, "w"))
        dist.barrier()
        cfg = load_config(args["config"], args["base"] + run["overrides"] + [f"train.out_dir={out}"])
        logs = []
        try:
            res = train(cfg, log=logs.append)
        except ValueError as e:
            if not run.get("expect_error"):
                raise
            results[run["name"]] = {"error": str(e)}
            continue
        dims = build_parallel_dims(cfg.parallel.ep_size)
        torch.save(_global_params(res.engine.module, dims), os.path.join(args["dump"], f"{run['name']}_rank{rank}.pt"))
        results[run["name"]] = {"losses": res.losses, "steps_done": res.steps_done, "log": logs,
                                "valid": res.valid_loss,
                                "optimizer": type(res.engine.optimizer).__name__}
        del res
    return results


def train_once(args: dict) -> dict:
    from mom_dist.config import load_config
    from mom_dist.parallel.dims import build_parallel_dims
    from mom_dist.train.trainer import train

    cfg = load_config(args["config"], args["overrides"])
    try:
        res = train(cfg, log=lambda *a: None)
    except ValueError as e:
        if not args.get("expect_error"):
            raise
        return {"error": str(e)}
    dims = build_parallel_dims(cfg.parallel.ep_size)
    if args.get("dump"):
        torch.save(_global_params(res.engine.module, dims), f"{args['dump']}_rank{dist.get_rank()}.pt")
    return {"losses": res.losses, "steps_done": res.steps_done, "valid": res.valid_loss}


def legacy_format(args: dict) -> dict:
    """A checkpoint in DeepSpeed's own format, written as mom_dist wrote it before the layout-free
    format (commit 463e3d8): ``engine.save_checkpoint`` files, RNG files holding
    ``{"torch": state, "python": random.getstate()}``, ``mom_state.json`` with no format mark nor
    engine counters. Trains ``args["steps"]`` steps uninterrupted (``full``), then the first half
    into ``legacy`` and saves it that way, then resumes it with this code to the end."""
    import json
    import random

    from mom_dist.config import load_config
    from mom_dist.parallel.dims import build_parallel_dims
    from mom_dist.train.trainer import train

    rank, steps = dist.get_rank(), args["steps"]
    out = {name: os.path.join(args["dump"], name) for name in ("full", "legacy")}
    ovr = args["overrides"] + [f"train.steps={steps}", "train.save_interval=0"]
    full = train(load_config(args["config"], ovr + [f"train.out_dir={out['full']}"]), log=lambda *a: None)
    cfg = load_config(args["config"], ovr + [f"train.out_dir={out['legacy']}", f"train.stop_after={steps // 2}"])
    first = train(cfg, log=lambda *a: None)
    dims = build_parallel_dims(cfg.parallel.ep_size)
    tag, ckpts = f"step{first.steps_done:08d}", os.path.join(out["legacy"], "checkpoints")
    first.engine.save_checkpoint(ckpts, tag=tag, save_latest=False)
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()},
               os.path.join(ckpts, tag, f"rng_rank{rank:05d}.pt"))
    torch.save(_global_params(first.engine.module, dims), os.path.join(args["dump"], f"saved_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(ckpts, tag, "mom_state.json"), "w") as f:
            json.dump({"step": first.steps_done, "consumed_samples": first.steps_done * cfg.train.global_batch_size,
                       "layout": {"world_size": dims.world_size, "ep_size": dims.ep_size}, "config": cfg.to_dict()},
                      f, indent=1, default=str)
        with open(os.path.join(ckpts, "latest"), "w") as f:
            f.write(tag)
    dist.barrier()
    logs = []
    resumed = train(load_config(args["config"], ovr + [f"train.out_dir={out['legacy']}"]), log=logs.append)
    return {"full": full.losses, "first": first.losses, "resumed": resumed.losses, "log": logs,
            "files": sorted(os.listdir(os.path.join(ckpts, tag)))}


if __name__ == "__main__":
    worker_main(globals())
