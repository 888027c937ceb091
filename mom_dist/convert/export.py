"""Exported models: one directory, one plain ``MoMModel``, no DeepSpeed needed to read it.

    <dir>/mom_config.json    the model config (``ModelConfig`` fields)
    <dir>/model.safetensors  the plain state dict (pool tensors stacked over all modules)

``export_run`` turns a training run (any layout) into one; ``load_exported`` reads it back.
``export_hf`` writes a transformers directory for GLUE/XSUM fine-tuning scripts: the vanilla
special case as a stock ``GPT2LMHeadModel``; a routed MoM as ``MoMForCausalLM``, whose code
travels in the directory (``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``,
with mom_dist installed).
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from mom_dist.config_utils import from_dict
from mom_dist.convert.checkpoints import consolidate
from mom_dist.convert.gpt2 import hf_from_layers, layers_from_mom
from mom_dist.model import MoMModel
from mom_dist.model.config import ModelConfig


def _refuse_existing(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"'{out_dir}' exists and is not empty; choose another output or pass --overwrite")


def save_exported(out_dir: str, cfg: ModelConfig, state_dict: dict, *, overwrite: bool = False) -> str:
    from safetensors.torch import save_file

    _refuse_existing(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "mom_config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(out_dir, "model.safetensors"))
    return out_dir


def export_run(run_dir: str, out_dir: str, *, tag: str | None = None, overwrite: bool = False) -> str:
    cfg, sd, _ = consolidate(run_dir, tag)
    return save_exported(out_dir, cfg, sd, overwrite=overwrite)


def load_exported(path: str, dtype: torch.dtype = torch.float32) -> MoMModel:
    """A ``MoMModel`` from an exported directory or directly from a training run."""
    from safetensors.torch import load_file

    if os.path.exists(os.path.join(path, "mom_config.json")):
        with open(os.path.join(path, "mom_config.json")) as f:
            cfg = from_dict(ModelConfig, json.load(f), "model.")
        cfg.validate()
        sd = load_file(os.path.join(path, "model.safetensors"))
    else:
        cfg, sd, _ = consolidate(path)
    model = MoMModel(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(dtype).eval()


def is_vanilla(cfg: ModelConfig) -> bool:
    """The spec §7 GPT-2 special case: every step runs module h, K=1, no SKIP."""
    return cfg.n_attn_modules == cfg.n_ffn_modules == cfg.n_steps and all(
        r.schedule == "diagonal" and r.top_k == 1 and not r.allow_skip for r in (cfg.attn_router, cfg.ffn_router))


def export_hf(model: MoMModel, out_dir: str, *, overwrite: bool = False) -> str:
    """A transformers directory: GPT2LMHeadModel for the vanilla case, else MoMForCausalLM."""
    if is_vanilla(model.cfg):
        return export_hf_gpt2(model, out_dir, overwrite=overwrite)
    return export_hf_mom(model, out_dir, overwrite=overwrite)


def export_hf_mom(model: MoMModel, out_dir: str, *, overwrite: bool = False) -> str:
    """A routed MoM as ``MoMForCausalLM`` with its code (``trust_remote_code``)."""
    import shutil

    from mom_dist.convert.hf_remote.configuration_mom import MoMConfig
    from mom_dist.convert.hf_remote.modeling_mom import MoMForCausalLM

    _refuse_existing(out_dir, overwrite)
    hf_cfg = MoMConfig(mom=dataclasses.asdict(model.cfg), vocab_size=model.cfg.vocab_size,
                       auto_map={"AutoConfig": "configuration_mom.MoMConfig",
                                 "AutoModelForCausalLM": "modeling_mom.MoMForCausalLM"})
    hf = MoMForCausalLM(hf_cfg)
    hf.mom.load_state_dict(model.state_dict())
    hf.save_pretrained(out_dir)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")
    for name in ("configuration_mom.py", "modeling_mom.py"):
        shutil.copy(os.path.join(src, name), out_dir)
    return out_dir


def export_hf_gpt2(model: MoMModel, out_dir: str, *, overwrite: bool = False) -> str:
    """Write a vanilla-schedule MoM (spec §7: the GPT-2 special case) as a GPT2LMHeadModel."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    if not is_vanilla(cfg):
        raise ValueError("only the vanilla special case (diagonal schedule, top_k=1, no SKIP) is a GPT-2; "
                         "export a routed MoM with export_hf (MoMForCausalLM, trust_remote_code)")
    _refuse_existing(out_dir, overwrite)
    embed, layers = layers_from_mom(model.state_dict(), cfg)
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                        n_layer=len(layers), n_head=cfg.n_heads, activation_function="gelu_new",
                        layer_norm_epsilon=cfg.layer_norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                        attn_pdrop=cfg.dropout, tie_word_embeddings=True)
    hf = GPT2LMHeadModel(hf_cfg)
    missing, unexpected = hf.load_state_dict(hf_from_layers(embed, layers), strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), missing
    hf.save_pretrained(out_dir)
    return out_dir
