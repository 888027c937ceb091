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
from mom_dist.convert.hf import TOKENIZER_FILE, check_tokenizer, read_safetensors_dir, refuse_existing
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


def run_tokenizer(state: dict) -> str | None:
    """The tokenizer a training run's data was made with: ``data.tokenizer_model`` of its config,
    else the ``tokenizer_model`` that mom-preprocess recorded next to its first data prefix."""
    data = (state.get("config") or {}).get("data") or {}
    if data.get("tokenizer_model") and os.path.isfile(data["tokenizer_model"]):
        return os.path.abspath(data["tokenizer_model"])
    prefixes = []
    for key in ("train_prefixes", "valid_prefixes"):  # a list, or one prefix as a string
        value = data.get(key) or []
        prefixes += [value] if isinstance(value, str) else list(value)
    for prefix in prefixes:
        try:
            with open(prefix + ".meta.json") as f:
                rel = json.load(f).get("tokenizer_model")
        except (OSError, ValueError):
            continue
        if rel:
            path = os.path.join(os.path.dirname(os.path.abspath(prefix)), rel)
            if os.path.isfile(path):
                return path
    return None


def export_run(run_dir: str, out_dir: str, *, tag: str | None = None, overwrite: bool = False,
               tokenizer: str | None = None) -> str:
    cfg, sd, state = consolidate(run_dir, tag)
    return save_exported(out_dir, cfg, sd, overwrite=overwrite, tokenizer=tokenizer or run_tokenizer(state))
