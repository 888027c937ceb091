"""Checkpoints: the engine's state in a layout-free format, with what the engine does not keep.

Layout of ``<out_dir>/checkpoints``:
    latest                      tag of the newest *complete* checkpoint (written last, atomically)
    step00000300/state_rank00001.safetensors
                                the pieces of the training state rank 1 owns: fp32 masters, Adam
                                moments, step counts, by single-process parameter name and global
                                offset (``mom_dist.train.sharded_state``)
    step00000300/mom_state.json step, consumed samples, layout, engine counters and schedule, config,
                                the step's loss and whether it was finite
    step00000300/rng_rank00001.pt   torch/python RNG state of each rank (plain tensors)

``latest`` changes only after every rank has finished writing (barrier), so a crash during a
save leaves the previous checkpoint in force; older complete checkpoints beyond ``keep_last``
are deleted only after that. A checkpoint resumes on any layout (world size, ``ep_size``, ZeRO
stage, precision): every rank reads the ranges its new layout owns (``engine_state``). A
checkpoint of DeepSpeed's own format (written by earlier versions) resumes on its own layout
only. A SIGTERM/SIGUSR1 (cluster preemption,
mom_dist.train.lifecycle) asks for a save at the next step boundary.

Safety (docs/usage.md): the trainer saves only finite states, and ``_prune`` never deletes the
newest checkpoint whose ``mom_state.json`` says ``finite``; RNG files are read as plain data
(``checkpoint_files``), and so is every ``.pt`` file of an old DeepSpeed-format checkpoint before
DeepSpeed unpickles it; a full disk during a save raises ``OSError(ENOSPC)`` naming the path,
with the previous ``latest`` untouched.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil

import torch
import torch.distributed as dist

from mom_dist.parallel import engine_state
from mom_dist.train.checkpoint_files import load_rng, save_rng, verify_plain
from mom_dist.train.sharded_state import FORMAT, ShardedState, write_pieces


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

    def layout(self) -> dict:
        e = self.engine
        return {"world_size": self.dims.world_size, "ep_size": self.dims.ep_size,
                "zero_stage": int(e.zero_optimization_stage()), "precision": "bf16" if e.bfloat16_enabled() else "fp32"}

    def save(self, step: int, consumed_samples: int, config: dict, loss: float | None = None) -> str:
        tag = f"step{step:08d}"
        path = os.path.join(self.dir, tag)
        if self.dims.rank == 0:
            if os.path.isdir(path) and tag != self.latest_tag():
                shutil.rmtree(path)  # left by an interrupted save of this step, perhaps by more ranks
            os.makedirs(path, exist_ok=True)
        _barrier()
        pieces, shapes, steps = engine_state.state_pieces(self.engine, self.dims)
        write_pieces(path, self.dims.rank, self.dims.world_size, pieces, shapes, steps)
        save_rng(os.path.join(path, f"rng_rank{self.dims.rank:05d}.pt"))
        if self.dims.rank == 0:
            with open(os.path.join(path, "mom_state.json"), "w") as f:
                json.dump({"step": step, "consumed_samples": consumed_samples, "format": FORMAT,
                           "layout": self.layout(), "engine": engine_state.engine_scalars(self.engine),
                           "config": config, **_finite_record(loss)}, f, indent=1, default=str)
        _barrier()  # every rank has written its files
        if self.dims.rank == 0:
            tmp = os.path.join(self.dir, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(self.dir, "latest"))
            self._prune(keep=tag)
        _barrier()
        return tag

    # ------------------------------------------------------------ safety (issue 7, part 2)
    def save_checked(self, step: int, consumed_samples: int, config: dict, loss: float) -> str:
        """``save``, with a full disk reported as such (torch.save says only "unexpected pos")."""
        path = os.path.join(self.dir, f"step{step:08d}")
        previous = self.latest_tag()
        try:
            return self.save(step, consumed_samples, config, loss=loss)
        except Exception as e:  # OSError; torch's RuntimeError; safetensors' SafetensorError
            if not _disk_full(e, self.dir):
                raise
            if self.dims.rank == 0 and previous != os.path.basename(path):
                shutil.rmtree(path, ignore_errors=True)  # the partial checkpoint: give the space back
            raise OSError(errno.ENOSPC, f"No space left on device while writing checkpoint '{path}'; 'latest' "
                          f"still names {previous or 'no checkpoint'}: free space (or lower train.keep_last) and "
                          "relaunch to resume") from None

    def _prune(self, keep: str) -> None:
        """Delete all but the ``keep_last`` newest checkpoints up to ``keep``, never ``keep`` and
        never the newest finite one before it: ``keep`` holds the weights *after* its step's
        update, which only the next step's loss confirms, so the checkpoint before it stays until
        then (with keep_last=1 two exist between saves). A checkpoint without the ``finite``
        record (older runs) counts as finite."""
        tags = sorted(t for t in os.listdir(self.dir) if t.startswith("step") and t <= keep)
        finite = [t for t in tags if t < keep and _is_finite(os.path.join(self.dir, t))]
        protected = {keep} | ({finite[-1]} if finite else set())
        for old in tags[:-self.keep_last]:
            if old not in protected:
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
        saved, now = state["layout"], self.layout()
        same_world = (saved["world_size"], saved["ep_size"]) == (now["world_size"], now["ep_size"])
        if state.get("format") == FORMAT:
            engine_state.restore_state(self.engine, self.dims, ShardedState(path, saved["world_size"]))
            engine_state.restore_scalars(self.engine, state["engine"])
        elif same_world:  # DeepSpeed's own format, written by earlier versions
            self._verify_plain(path)  # its loader unpickles fully: refuse files that would run code
            load_path, _ = self.engine.load_checkpoint(self.dir, tag=tag)
            if load_path is None:
                raise ValueError(f"DeepSpeed could not load checkpoint '{path}'")
        else:
            raise ValueError(
                f"checkpoint '{path}' is in DeepSpeed's own format (earlier mom_dist), which resumes only with "
                f"world_size={saved['world_size']}, ep_size={saved['ep_size']} (this run: world_size="
                f"{now['world_size']}, ep_size={now['ep_size']}); resume once with that layout (its next "
                "checkpoint resumes on any layout), or start a new run from its weights with train.init_from")
        rng_file = os.path.join(path, f"rng_rank{self.dims.rank:05d}.pt")
        if os.path.exists(rng_file):
            load_rng(rng_file)
        else:  # a rank the writing layout did not have: its own stream, moved on by the step
            torch.manual_seed(torch.initial_seed() + 1_000_003 * state["step"])
            random.seed(torch.initial_seed())
        changed = {k: (saved.get(k), now[k]) for k in now if saved.get(k, now[k]) != now[k]}
        state["resharded"] = f"resharded from {_describe(saved)} to {_describe(now)}" if changed else None
        return state

    def rollback_before(self, first_bad_step: int) -> tuple[str | None, bool]:
        """A run diverged from ``first_bad_step`` on: a ``latest`` saved at the step just before
        holds the update that produced the first non-finite step, so point ``latest`` back at
        the newest finite checkpoint before it (kept by ``_prune``). Returns (``latest`` after,
        whether it is still that suspect checkpoint because no older one exists)."""
        tag = self.latest_tag()
        suspect = tag is not None and int(tag[4:]) >= first_bad_step - 1
        if suspect:
            older = sorted(t for t in os.listdir(self.dir) if t.startswith("step") and t < tag
                           and _is_finite(os.path.join(self.dir, t)))
            if older:
                if self.dims.rank == 0:
                    tmp = os.path.join(self.dir, "latest.tmp")
                    with open(tmp, "w") as f:
                        f.write(older[-1])
                    os.replace(tmp, os.path.join(self.dir, "latest"))
                tag, suspect = older[-1], False
        _barrier()
        return tag, suspect

    def _verify_plain(self, path: str) -> None:
        """Every .pt file of the checkpoint is plain data, checked before DeepSpeed's loader
        (which unpickles fully) touches any; all ranks learn the first problem found."""
        error = None
        try:
            verify_plain(path, self.dims.rank, self.dims.world_size)
        except ValueError as e:
            error = str(e)
        if dist.is_initialized() and dist.get_world_size() > 1:
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e), None)
        if error:
            raise ValueError(error)


def _finite_record(loss: float | None) -> dict:
    import math

    return {} if loss is None else {"loss": loss, "finite": math.isfinite(loss)}


def _is_finite(tag_dir: str) -> bool:
    try:
        with open(os.path.join(tag_dir, "mom_state.json")) as f:
            return bool(json.load(f).get("finite", True))
    except (OSError, ValueError):
        return False  # incomplete: not a checkpoint to protect


def _disk_full(err: Exception, path: str) -> bool:
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err):
        return True
    try:  # torch.save's zip writer reports a short write as "unexpected pos ..."
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False


def _describe(layout: dict) -> str:
    text = f"world {layout['world_size']} / EP{layout['ep_size']}"
    if "zero_stage" in layout:
        text += f" / ZeRO-{layout['zero_stage']}"
    return text + (" / bf16" if layout.get("precision") == "bf16" else "")
