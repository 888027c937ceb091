"""Read a training checkpoint back as one plain model, whatever layout wrote it.

``consolidate(ckpt_dir)`` assembles the fp32 masters of a checkpoint (the ``param`` pieces of
``shards``, written by every rank) into the state dict of a plain ``MoMModel``, with the run's
config. Checkpoints in DeepSpeed's own format (earlier versions) are read from its files:
non-module weights from ``mp_rank_00_model_states.pt`` and one ``layer_{L}_expert_{r}_...``
file per pool and EP rank (its slice of the stacked module tensors), never running code from
them (``safe_load``). Every file ``mom_state.json`` records is checked against its size and
checksum before it is read (``integrity``); a damaged one is one line naming it and the previous
good checkpoint. ``same_architecture`` says whether the weights of one model config load into
another.
"""

from __future__ import annotations

import glob
import os

import torch

from mom_dist.checkpoint.integrity import verify_files
from mom_dist.checkpoint.layout import find_tag_dir, read_state
from mom_dist.checkpoint.safe_load import load_plain
from mom_dist.checkpoint.shards import FORMAT, ShardedState
from mom_dist.config_utils import from_dict
from mom_dist.model.config import ModelConfig


def consolidate(path: str, tag: str | None = None) -> tuple[ModelConfig, dict, dict]:
    """(model config, plain state dict, mom_state) of a checkpoint written by the trainer."""
    tag_dir = find_tag_dir(path, tag)
    state = read_state(tag_dir)
    mcfg = from_dict(ModelConfig, state["config"]["model"], "model.")
    if state.get("format") == FORMAT:
        reader = ShardedState(tag_dir, state["layout"]["world_size"], records=state.get("files"))
        sd = {name: reader.full("param", name) for name in reader.shapes}
    else:
        verify_files(tag_dir, state.get("files"))
        sd = _consolidate_deepspeed(tag_dir)
    missing = _expected_keys(mcfg) - set(sd)
    if missing:
        raise ValueError(f"checkpoint '{tag_dir}' lacks {len(missing)} weights (e.g. {sorted(missing)[:3]}); "
                         "it is truncated or was written by another model layout")
    return mcfg, sd, state


def _consolidate_deepspeed(tag_dir: str) -> dict:
    # Where DeepSpeed's MoE checkpointing put a pool's tensors (imported here: only this old
    # format needs DeepSpeed's names, and importing DeepSpeed takes seconds).
    from mom_dist.parallel.deepspeed_engine import EXPERT_KEY

    main = load_plain(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))  # never runs code from the file
    sd = dict(main["module"])
    slices: dict[str, list] = {}  # plain key -> [(EP rank, local slice of the stacked pool tensor)]
    for f in glob.glob(os.path.join(tag_dir, "layer_*_expert_*_mp_rank_00_model_states.pt")):
        for k, v in load_plain(f).items():
            m = EXPERT_KEY.search(k)
            slices.setdefault(EXPERT_KEY.sub(".", k), []).append((int(m.group(1)), v))
    for k, parts in slices.items():
        sd[k] = torch.cat([v for _, v in sorted(parts, key=lambda x: x[0])])
    return sd


def _expected_keys(mcfg: ModelConfig) -> set:
    from mom_dist.model import MoMModel
    with torch.device("meta"):
        return set(MoMModel(mcfg).state_dict())


def same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    """Same parameter shapes and names (the weights of one load into the other)."""
    keys = ("vocab_size", "max_seq_len", "d_model", "n_heads", "n_bottom", "n_top", "n_chunks",
            "n_attn_modules", "n_ffn_modules", "anchor", "router_bias")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and \
        (a.attn_router.kind, a.attn_router.dim, a.ffn_router.kind, a.ffn_router.dim) == \
        (b.attn_router.kind, b.attn_router.dim, b.ffn_router.kind, b.ffn_router.dim)
