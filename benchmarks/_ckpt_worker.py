"""Per-rank measurements for ``benchmarks/checkpoint_io.py`` (issue 7), run in real gloo processes.

    python benchmarks/_ckpt_worker.py ckpt_io '<json args>' <result.json>

For each (EP, ZeRO) layout: build the engine, take one optimizer step (so Adam's state exists),
then time save and load of a checkpoint in the layout-free format (``Checkpointer``: every
rank writes its pieces) and in DeepSpeed's own format (``engine.save_checkpoint`` /
``load_checkpoint``, what mom_dist wrote before), ``repeats`` times each. Returns this rank's
times and the bytes it wrote. Nothing here asserts on timings.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mom_dist.config import load_config  # noqa: E402
from mom_dist.model import MoMModel  # noqa: E402
from mom_dist.parallel import deepspeed_engine  # noqa: E402
from mom_dist.parallel.dims import build_parallel_dims  # noqa: E402
from mom_dist.parallel.expert_parallel import apply_expert_parallel  # noqa: E402
from mom_dist.parallel.local_launch import worker_main  # noqa: E402
from mom_dist.train.batches import SyntheticTokens  # noqa: E402
from mom_dist.train.checkpoint import Checkpointer  # noqa: E402


def _ds_file_owner(name: str, world: int, ep: int) -> int | None:
    """The rank that wrote one of DeepSpeed's checkpoint files (its naming scheme)."""
    if name.startswith("mp_rank_") or name.startswith("zero_to"):
        return 0
    m = re.match(r"(?:bf16_)?zero_pp_rank_(\d+)_", name)
    if m:
        return int(m.group(1))
    m = re.match(r"layer_\d+_expert_(\d+)_", name) or re.match(r"expp_rank_(\d+)_", name)
    if m:  # written by expert-data-parallel rank 0 of that EP rank: global rank = EP rank
        return int(m.group(1))
    return None


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    took = time.perf_counter() - t0
    dist.barrier()
    return took


def ckpt_io(args: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for layout in args["layouts"]:
        ep, zero = layout["ep"], layout["zero"]
        cfg = load_config(None, args["overrides"] + [f"parallel.ep_size={ep}", f"parallel.zero_stage={zero}"])
        dims = build_parallel_dims(ep)
        torch.manual_seed(0)
        model = MoMModel(cfg.model)
        apply_expert_parallel(model, dims)
        engine, _ = deepspeed_engine.initialize(model, cfg, dims)
        t = cfg.train
        batches = SyntheticTokens(cfg.model.vocab_size, t.seq_len, 1).iterator(
            global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size, dp_rank=rank, dp_size=world)
        for _ in range(deepspeed_engine.gradient_accumulation(cfg, dims)):
            b = next(batches)
            engine.backward(engine(b["tokens"], b["labels"]).loss)
            engine.step()
        root = os.path.join(args["dir"], f"ep{ep}_z{zero}")
        new_dir, old_dir = os.path.join(root, "new"), os.path.join(root, "old")
        ckpt = Checkpointer(new_dir, engine, dims, keep_last=1)
        res = {"new_save": [], "new_load": [], "old_save": [], "old_load": []}
        for i in range(args["repeats"]):
            tag = f"step{i + 1:08d}"
            res["new_save"].append(_timed(lambda: ckpt.save(i + 1, 0, cfg.to_dict())))
            res["new_load"].append(_timed(lambda: ckpt.load(cfg.model)))
            res["old_save"].append(_timed(lambda: engine.save_checkpoint(old_dir, tag=tag, save_latest=False)))
            res["old_load"].append(_timed(lambda: engine.load_checkpoint(old_dir, tag=tag)))
        last = f"step{args['repeats']:08d}"
        new_tag = os.path.join(new_dir, "checkpoints", last)
        res["new_bytes"] = sum(os.path.getsize(os.path.join(new_tag, f)) for f in os.listdir(new_tag)
                               if f.endswith(f"rank{rank:05d}.safetensors") or f.endswith(f"rank{rank:05d}.pt")
                               or (rank == 0 and f == "mom_state.json"))
        old_tag = os.path.join(old_dir, last)
        res["old_bytes"] = sum(os.path.getsize(os.path.join(old_tag, f)) for f in os.listdir(old_tag)
                               if _ds_file_owner(f, world, ep) == rank)
        if rank == 0:
            res["old_unattributed"] = [f for f in os.listdir(old_tag) if _ds_file_owner(f, world, ep) is None]
            res["n_params"] = sum(p.numel() for p in MoMModel(cfg.model).parameters())
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root)
        out[f"ep{ep}_z{zero}"] = res
        del engine, model, ckpt
    return out


if __name__ == "__main__":
    worker_main(globals())
