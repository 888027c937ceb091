"""Read training checkpoints back as one plain model, whatever layout wrote them.

``consolidate(ckpt_dir)`` assembles the fp32 masters of a checkpoint (the ``param`` pieces of
``mom_dist.train.sharded_state``, written by every rank) into the state dict of a plain
``MoMModel``, with the run's config. Checkpoints in DeepSpeed's own format (earlier versions)
are read from its files: non-module weights from ``mp_rank_00_model_states.pt`` and one
``layer_{L}_expert_{r}_...`` file per pool and EP rank (its slice of the stacked module tensors).
``init_from_source`` starts a run from a checkpoint of any layout or an exported directory
(same architecture: weights copied; a vanilla GPT-2 run: phase-2 decomposition) or from a
Hugging Face GPT-2 directory.
"""

from __future__ import annotations

import glob
import json
import os
import re

import torch

from mom_dist.config_utils import from_dict
from mom_dist.model.config import ModelConfig
from mom_dist.train.checkpoint_files import load_plain
from mom_dist.train.sharded_state import FORMAT, ShardedState

# Where DeepSpeed's MoE checkpointing puts a pool's tensors (see PoolAsDeepSpeedMoE); group 1 is
# the EP rank whose slice the file holds.
EXPERT_KEY = re.compile(r"\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.")


def _tag_dir(path: str, tag: str | None) -> str:
    if os.path.exists(os.path.join(path, "mom_state.json")):
        return path
    ckpts = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if tag is None:
        latest = os.path.join(ckpts, "latest")
        if not os.path.exists(latest):
            raise ValueError(f"'{path}' holds no 'latest' file and no mom_state.json: pass a run directory, its "
                             "checkpoints/ directory or one step directory")
        tag = open(latest).read().strip()
    tag_dir = os.path.join(ckpts, tag)
    if not os.path.exists(os.path.join(tag_dir, "mom_state.json")):
        raise ValueError(f"checkpoint '{tag_dir}' is incomplete (no mom_state.json)")
    return tag_dir


def consolidate(path: str, tag: str | None = None) -> tuple[ModelConfig, dict, dict]:
    """(model config, plain state dict, mom_state) of a checkpoint written by the trainer."""
    tag_dir = _tag_dir(path, tag)
    with open(os.path.join(tag_dir, "mom_state.json")) as f:
        state = json.load(f)
    mcfg = from_dict(ModelConfig, state["config"]["model"], "model.")
    if state.get("format") == FORMAT:
        reader = ShardedState(tag_dir, state["layout"]["world_size"])
        sd = {name: reader.full("param", name) for name in reader.shapes}
    else:
        sd = _consolidate_deepspeed(tag_dir)
    missing = _expected_keys(mcfg) - set(sd)
    if missing:
        raise ValueError(f"checkpoint '{tag_dir}' lacks {len(missing)} weights (e.g. {sorted(missing)[:3]}); "
                         "it is truncated or was written by another model layout")
    return mcfg, sd, state


def _consolidate_deepspeed(tag_dir: str) -> dict:
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


def init_from_source(model, source: str) -> None:
    """Initialise ``model``'s weights (the optimizer starts fresh) from a trainer run or checkpoint
    of any layout, a ``mom-convert export`` / ``from-release`` directory, or a Hugging Face GPT-2
    directory."""
    from mom_dist.convert.gpt2 import init_mom_from_gpt2

    if os.path.exists(os.path.join(source, "mom_config.json")):  # an exported directory (export, from-release)
        from mom_dist.convert.export import load_exported
        exported = load_exported(source)
        src_cfg, sd = exported.cfg, exported.state_dict()
    elif os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")) and \
            not os.path.exists(os.path.join(source, "checkpoints")):
        init_mom_from_gpt2(model, source)
        return
    else:
        src_cfg, sd, _ = consolidate(source)
    if same_architecture(src_cfg, model.cfg):
        model.load_state_dict({k: v.to(model.wte.weight.dtype) for k, v in sd.items()})
    else:  # a vanilla GPT-2 trained by us: phase-2 decomposition
        init_mom_from_gpt2(model, sd, source_cfg=src_cfg)


def same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    """Same parameter shapes and names (the weights of one load into the other)."""
    keys = ("vocab_size", "max_seq_len", "d_model", "n_heads", "n_bottom", "n_top", "n_chunks",
            "n_attn_modules", "n_ffn_modules", "anchor", "router_bias")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and \
        (a.attn_router.kind, a.attn_router.dim, a.ffn_router.kind, a.ffn_router.dim) == \
        (b.attn_router.kind, b.attn_router.dim, b.ffn_router.kind, b.ffn_router.dim)
