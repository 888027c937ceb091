"""Checkpoints through the DeepSpeed engine, with what the engine does not keep.

Layout of ``<out_dir>/checkpoints``:
    latest                      tag of the newest *complete* checkpoint (written last, atomically)
    step00000300/               DeepSpeed's files: non-module weights, one file per module
                                (written by its owning EP rank), optimizer/ZeRO shards, scheduler
    step00000300/mom_state.json step, consumed samples, layout, config
    step00000300/rng_rank00001.pt   torch/python RNG state of each rank

``latest`` changes only after every rank has finished writing (barrier), so a crash during a
save leaves the previous checkpoint in force; older complete checkpoints beyond ``keep_last``
are deleted only after that. Resuming requires the same EP size and world size (DeepSpeed's
optimizer shards are tied to the layout); a mismatch is an error before anything is loaded.
A SIGTERM/SIGUSR1 (cluster preemption, mom_dist.train.lifecycle) asks for a save at the next
step boundary.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import torch
import torch.distributed as dist


def _barrier():
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, out_dir: str, engine, dims, keep_last: int):
        self.dir = os.path.join(out_dir, "checkpoints")
        self.engine, self.dims, self.keep_last = engine, dims, keep_last
        if dims.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
        _barrier()

    def latest_tag(self) -> str | None:
        path = os.path.join(self.dir, "latest")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return f.read().strip() or None

    def save(self, step: int, consumed_samples: int, config: dict) -> str:
        tag = f"step{step:08d}"
        layout = {"world_size": self.dims.world_size, "ep_size": self.dims.ep_size}
        self.engine.save_checkpoint(self.dir, tag=tag, save_latest=False)
        path = os.path.join(self.dir, tag)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        torch.save(rng, os.path.join(path, f"rng_rank{self.dims.rank:05d}.pt"))
        if self.dims.rank == 0:
            with open(os.path.join(path, "mom_state.json"), "w") as f:
                json.dump({"step": step, "consumed_samples": consumed_samples, "layout": layout, "config": config},
                          f, indent=1, default=str)
        _barrier()  # every rank has written its files
        if self.dims.rank == 0:
            tmp = os.path.join(self.dir, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(self.dir, "latest"))
            self._prune(keep=tag)
        _barrier()
        return tag

    def _prune(self, keep: str) -> None:
        tags = sorted(t for t in os.listdir(self.dir) if t.startswith("step") and t <= keep)
        for old in tags[:-self.keep_last]:
            shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)

    def load(self, model_cfg, tag: str | None = None) -> dict | None:
        """Restore engine, schedule, RNG; return the saved mom_state (None if nothing to resume).
        A checkpoint of another model architecture is refused before anything is loaded (a run
        would otherwise go on to prune it)."""
        tag = tag or self.latest_tag()
        if tag is None:
            return None
        path = os.path.join(self.dir, tag)
        state_file = os.path.join(path, "mom_state.json")
        if not os.path.exists(state_file):
            raise ValueError(f"checkpoint '{path}' is incomplete (no mom_state.json); point 'latest' at a complete "
                             "checkpoint or remove it")
        with open(state_file) as f:
            state = json.load(f)
        from mom_dist.config_utils import from_dict
        from mom_dist.convert.checkpoints import same_architecture
        from mom_dist.model.config import ModelConfig

        if not same_architecture(from_dict(ModelConfig, state["config"]["model"], "model."), model_cfg):
            raise ValueError(f"'{self.dir}' holds checkpoints of a different model architecture; use a new "
                             "train.out_dir (to start from those weights, set train.init_from to that run)")
        layout = state["layout"]
        if layout["ep_size"] != self.dims.ep_size or layout["world_size"] != self.dims.world_size:
            raise ValueError(
                f"checkpoint '{path}' was written with world_size={layout['world_size']}, "
                f"ep_size={layout['ep_size']}; this run has world_size={self.dims.world_size}, "
                f"ep_size={self.dims.ep_size}. Resume with the same layout, or convert it with "
                "`mom-convert consolidate` and start a new run from it (train.init_from)")
        load_path, _ = self.engine.load_checkpoint(self.dir, tag=tag)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load checkpoint '{path}'")
        rng = torch.load(os.path.join(path, f"rng_rank{self.dims.rank:05d}.pt"), weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        return state
