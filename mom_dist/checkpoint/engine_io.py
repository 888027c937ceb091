"""A DeepSpeed engine's training state into a step directory, and back in any layout.

``save_engine`` has every rank write the pieces it owns (``engine_state`` -> ``shards``) and its
RNG state, rank 0 the step's ``mom_state.json`` with every rank's file records (size, checksum:
``integrity``), and moves ``latest`` only once every rank has finished, so a crash during a save
leaves the previous checkpoint in force; a rank that cannot write (a full disk) makes every rank
raise, none is left waiting. ``load_engine`` first verifies the recorded files (the ranks share
the reading), then restores the engine, its schedule and counters, and this rank's RNG,
whatever layout (world size, ``ep_size``, ZeRO stage, precision) wrote the checkpoint. A checkpoint of DeepSpeed's own
format (written by earlier mom_dist versions) resumes on its own layout only, through
DeepSpeed's loader, after every ``.pt`` file was checked to be plain data.
"""

from __future__ import annotations

import math
import os
import random
import shutil

import torch
import torch.distributed as dist

from mom_dist.checkpoint import engine_state
from mom_dist.checkpoint.integrity import first_error_everywhere, verify_files
from mom_dist.checkpoint.layout import rank_file, read_latest, rng_file, write_latest, write_state
from mom_dist.checkpoint.safe_load import load_rng, save_rng, verify_plain_all
from mom_dist.checkpoint.shards import FORMAT, ShardedState, write_pieces


def barrier():
    if dist.is_initialized():
        dist.barrier()


def engine_layout(engine, dims) -> dict:
    """The layout a checkpoint records (and a resume compares with)."""
    return {"world_size": dims.world_size, "ep_size": dims.ep_size,
            "zero_stage": int(engine.zero_optimization_stage()),
            "precision": "bf16" if engine.bfloat16_enabled() else "fp32"}


def save_engine(ckpt_dir: str, tag: str, engine, dims, record: dict, loss: float | None = None) -> str:
    """Write the checkpoint ``tag`` (every rank calls this) and make it ``latest``; ``record``
    holds what the trainer adds to ``mom_state.json`` (step, consumed samples, config, and
    anything else it reads back on resume). Returns the step directory."""
    path = os.path.join(ckpt_dir, tag)
    if dims.rank == 0:
        if os.path.isdir(path) and tag != read_latest(ckpt_dir):
            shutil.rmtree(path)  # left by an interrupted save of this step, perhaps by more ranks
        os.makedirs(path, exist_ok=True)
    barrier()
    pieces, shapes, steps = engine_state.state_pieces(engine, dims)

    def write_rank_files() -> dict:
        return {os.path.basename(rank_file(path, dims.rank)):
                write_pieces(path, dims.rank, dims.world_size, pieces, shapes, steps),
                os.path.basename(rng_file(path, dims.rank)): save_rng(rng_file(path, dims.rank))}

    files = {name: rec for recs in _on_every_rank(write_rank_files) for name, rec in sorted(recs.items())}

    def write_mom_state() -> None:
        if dims.rank == 0:
            finite = {} if loss is None else {"loss": loss, "finite": math.isfinite(loss)}
            write_state(path, {"step": record["step"], "consumed_samples": record["consumed_samples"],
                               "format": FORMAT, "layout": engine_layout(engine, dims),
                               "engine": engine_state.engine_scalars(engine), **record, **finite, "files": files})

    _on_every_rank(write_mom_state)  # also the barrier: every rank has written its files
    if dims.rank == 0:
        write_latest(ckpt_dir, tag)
    return path


def _on_every_rank(fn) -> list:
    """``fn()`` on every rank, results gathered (a collective). If any rank failed, every rank
    raises - its own exception, or an OSError with the failing rank's errno (a full disk reads
    as one everywhere) - so no rank is left waiting in the next collective."""
    result, failure = None, None
    try:
        result = fn()
    except Exception as e:  # OSError; safetensors' and torch's wrappers of a failed write
        failure = e
    mine = (result, None if failure is None else (getattr(failure, "errno", None), str(failure)))
    gathered = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    if failure is not None:
        raise failure
    for rank, (_, failed) in enumerate(gathered):
        if failed is not None:
            raise OSError(failed[0] or 0, f"rank {rank} could not write its part of the checkpoint: {failed[1]}")
    return [r for r, _ in gathered]


def load_engine(tag_dir: str, engine, dims, state: dict) -> str | None:
    """Restore the engine and this rank's RNG from the checkpoint in ``tag_dir`` (its
    ``mom_state.json`` is ``state``). Returns how it was resharded, or None on its own layout."""
    saved, now = state["layout"], engine_layout(engine, dims)
    same_world = (saved["world_size"], saved["ep_size"]) == (now["world_size"], now["ep_size"])
    if state.get("files"):  # the ranks share the reading; every rank raises the first problem
        first_error_everywhere(lambda: verify_files(tag_dir, state["files"], dims.rank, dims.world_size))
    if state.get("format") == FORMAT:
        engine_state.restore_state(engine, dims, ShardedState(tag_dir, saved["world_size"]))
        engine_state.restore_scalars(engine, state["engine"])
    elif same_world:  # DeepSpeed's own format, written by earlier versions
        verify_plain_all(tag_dir, dims.rank, dims.world_size)  # its loader unpickles fully: refuse code
        load_path, _ = engine.load_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir))
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load checkpoint '{tag_dir}'")
    else:
        raise ValueError(
            f"checkpoint '{tag_dir}' is in DeepSpeed's own format (earlier mom_dist), which resumes only with "
            f"world_size={saved['world_size']}, ep_size={saved['ep_size']} (this run: world_size="
            f"{now['world_size']}, ep_size={now['ep_size']}); resume once with that layout (its next "
            "checkpoint resumes on any layout), or start a new run from its weights with train.init_from")
    rng = rng_file(tag_dir, dims.rank)
    if os.path.exists(rng):
        load_rng(rng)
    else:  # a rank the writing layout did not have: its own stream, moved on by the step
        torch.manual_seed(torch.initial_seed() + 1_000_003 * state["step"])
        random.seed(torch.initial_seed())
    changed = {k: (saved.get(k), now[k]) for k in now if saved.get(k, now[k]) != now[k]}
    return f"resharded from {describe(saved)} to {describe(now)}" if changed else None


def describe(layout: dict) -> str:
    text = f"world {layout['world_size']} / EP{layout['ep_size']}"
    if "zero_stage" in layout:
        text += f" / ZeRO-{layout['zero_stage']}"
    return text + (" / bf16" if layout.get("precision") == "bf16" else "")
