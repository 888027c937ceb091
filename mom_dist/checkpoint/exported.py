"""Exported models: one directory, one plain ``MoMModel``, no DeepSpeed needed to read it.

    <dir>/mom_config.json    the model config (``ModelConfig`` fields)
    <dir>/model.safetensors  the plain state dict (pool tensors stacked over all modules)
    <dir>/tokenizer.model    the SentencePiece model the training data was made with (when known)

``export_run`` turns a training run (any layout) into one (``mom-convert export``);
``save_exported`` writes one from a model config and state dict (``mom-convert from-hf`` /
``from-release``, ``mom-finetune``); ``read_exported`` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from mom_dist.checkpoint.consolidate import consolidate
from mom_dist.config_utils import from_dict
from mom_dist.convert.hf import check_tokenizer, read_safetensors_dir, refuse_existing
from mom_dist.convert.model_tokenizer import TOKENIZER_FILE, choose_tokenizer, run_tokenizer_search
from mom_dist.model.config import ModelConfig

CONFIG_FILE = "mom_config.json"


def is_exported(path: str) -> bool:
    return os.path.exists(os.path.join(path, CONFIG_FILE))


def save_exported(out_dir: str, cfg: ModelConfig, state_dict: dict, *, overwrite: bool = False,
                  tokenizer: str | None = None) -> str:
    from safetensors.torch import save_file

    refuse_existing(out_dir, overwrite)
    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg.vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(out_dir, "model.safetensors"))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(out_dir, TOKENIZER_FILE))
    return out_dir


def read_exported(path: str) -> tuple[ModelConfig, dict]:
    """(model config, plain state dict) of an exported directory."""
    with open(os.path.join(path, CONFIG_FILE)) as f:
        cfg = from_dict(ModelConfig, json.load(f), "model.")
    cfg.validate()
    return cfg, read_safetensors_dir(path)


def export_run(run_dir: str, out_dir: str, *, tag: str | None = None, overwrite: bool = False,
               tokenizer: str | None = None, no_tokenizer: bool = False) -> str:
    """One plain model directory from a run; its tokenizer goes with it (``tokenizer``, which
    must be the run's own, else the one the run records). A run that records a tokenizer which
    cannot be found is refused unless ``no_tokenizer`` (nothing is written silently without it)."""
    cfg, sd, state = consolidate(run_dir, tag)
    tok = None
    if not no_tokenizer:
        search = run_tokenizer_search(state)
        tok = choose_tokenizer(run_dir, search, tokenizer)
        if tok is None and search.looked_for:
            raise ValueError(f"{search.missing(run_dir)}; pass --tokenizer M.model (the SentencePiece model its "
                             "data was made with), or --no-tokenizer to export the weights alone")
    return save_exported(out_dir, cfg, sd, overwrite=overwrite, tokenizer=tok)
