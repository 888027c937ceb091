"""Weights from any source: a training run, an exported directory, a transformers directory.

    model, tokenizer = load_source(path)   # mom-eval, mom-convert to-hf, mom-finetune
    model, search = read_source(path)      # the same, with where the tokenizer was looked for
    init_from_source(model, path)          # train.init_from (the optimizer starts fresh)

A source is a run directory (or its ``checkpoints/`` or one step directory; any layout, our
format or DeepSpeed's of earlier versions), a ``mom-convert export`` / ``from-release``
directory, or a transformers directory (``mom-convert to-hf``: MoM or GPT-2; a Hugging Face
GPT-2 for ``train.init_from``). Foreign formats are read through ``mom_dist.convert``.
"""

from __future__ import annotations

import os

import torch

from mom_dist.checkpoint.consolidate import consolidate, same_architecture
from mom_dist.checkpoint.exported import is_exported, read_exported
from mom_dist.checkpoint.layout import checkpoints_dir
from mom_dist.convert.hf import is_hf_dir, is_vanilla, read_hf_dir
from mom_dist.convert.model_tokenizer import TokenizerSearch, dir_tokenizer_search, run_tokenizer_search
from mom_dist.model import MoMModel


def load_source(path: str, dtype: torch.dtype = torch.float32) -> tuple[MoMModel, str | None]:
    """(model, tokenizer path or None) from a run directory (or one of its checkpoints), a
    ``mom-convert export`` directory, or a ``mom-convert to-hf`` directory (MoM or GPT-2)."""
    model, search = read_source(path, dtype)
    return model, search.path


def read_source(path: str, dtype: torch.dtype = torch.float32) -> tuple[MoMModel, TokenizerSearch]:
    """``load_source`` with where the tokenizer was looked for (for the message when it is missing)."""
    if not os.path.isdir(path):
        raise ValueError(f"'{path}' is not a directory: pass a run directory, a mom-convert export "
                         "directory or a mom-convert to-hf directory")
    tok = dir_tokenizer_search(path)
    if is_exported(path):
        cfg, sd = read_exported(path)
    elif is_hf_dir(path):
        cfg, sd = read_hf_dir(path)
        if is_vanilla(cfg):  # a GPT-2 has no routers; the vanilla schedule's picks do not use them
            own = MoMModel(cfg).state_dict()
            sd = {**{k: v for k, v in own.items() if "_router." in k}, **sd}
    else:
        cfg, sd, state = consolidate(path)
        tok = run_tokenizer_search(state)
    model = MoMModel(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(dtype).eval(), tok


def load_exported(path: str, dtype: torch.dtype = torch.float32) -> MoMModel:
    """A ``MoMModel`` from an exported, transformers or training-run directory."""
    return load_source(path, dtype)[0]


def init_from_source(model, source: str) -> None:
    """Initialise ``model``'s weights (the optimizer starts fresh) from a trainer run or checkpoint
    of any layout, a ``mom-convert export`` / ``from-release`` directory, or a Hugging Face GPT-2
    directory."""
    from mom_dist.convert.gpt2 import init_mom_from_gpt2

    if is_exported(source):  # an exported directory (export, from-release)
        exported = load_exported(source)
        src_cfg, sd = exported.cfg, exported.state_dict()
    elif os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")) and \
            not os.path.exists(checkpoints_dir(source)):
        init_mom_from_gpt2(model, source)
        return
    else:
        src_cfg, sd, _ = consolidate(source)
    if same_architecture(src_cfg, model.cfg):
        model.load_state_dict({k: v.to(model.wte.weight.dtype) for k, v in sd.items()})
    else:  # a vanilla GPT-2 trained by us: phase-2 decomposition
        init_mom_from_gpt2(model, sd, source_cfg=src_cfg)
