"""Adapters between GPT-2 weights and MoM weights (spec §8, phase-2 initialisation).

The common currency is a *layer list*: ``embed`` (``wte.weight``, ``wpe.weight``,
``ln_f.weight``, ``ln_f.bias``) and one dict per GPT-2 layer, keyed like ``layers.Block``
(``attn.ln.weight``, ``attn.qkv.weight``, ..., ``ffn.proj.bias``). Adapters read a layer list
from a Hugging Face GPT-2 (directory, module or state dict) or from our own vanilla MoM, and
write one into a MoM of any layout:

    bottom layers map 1:1; for each chunk the next max(N_A, N_F) layers become modules 0..,
    the next becomes the anchor (if any); top layers map 1:1; embeddings and the final
    LayerNorm are copied (the authors' release forgets ln_f).

Routers are not part of GPT-2 and keep their fresh initialisation.
"""

from __future__ import annotations

import os

import torch

from mom_dist.model.config import ModelConfig

# Hugging Face GPT-2 sub-keys -> our Block sub-keys (both store Linear weights as (in, out)).
HF_TO_BLOCK = {
    "ln_1": "attn.ln", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
    "ln_2": "ffn.ln", "mlp.c_fc": "ffn.fc", "mlp.c_proj": "ffn.proj",
}
ATTN_KEYS = ("attn.ln", "attn.qkv", "attn.proj")
FFN_KEYS = ("ffn.ln", "ffn.fc", "ffn.proj")


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def read_hf_state_dict(source) -> dict:
    """A GPT-2 state dict from a GPT2LMHeadModel/GPT2Model, a dict, or a local HF directory."""
    if isinstance(source, torch.nn.Module):
        return source.state_dict()
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(source, name)):
                return read_weights_file(os.path.join(source, name))
        raise ValueError(f"'{source}' holds neither model.safetensors nor pytorch_model.bin: "
                         "pass a directory written by GPT2LMHeadModel.save_pretrained")
    raise ValueError(f"cannot read GPT-2 weights from {source!r}: pass a transformers GPT-2 module, "
                     "its state dict, or a local save_pretrained directory")


def read_weights_file(path: str) -> dict:
    """The state dict in a transformers weights file (``model.safetensors`` or a ``pytorch_model.bin``
    pickle), read without running code from it. A pickle that names anything but plain data, a
    truncated or foreign file: ``ValueError`` naming the file (never a traceback, never executed).

    The pickle's globals are listed from its opcodes first (nothing runs); any global at all is
    refused (a transformers save holds tensors only), then ``torch.load(weights_only=True)`` reads it."""
    import pickle

    def refuse(what: str):
        raise ValueError(f"refusing to load '{path}': it is not plain tensor data and loading it could run code "
                         f"({what[:160]}); only use weights from a source you trust, saved with save_pretrained")

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            try:  # reads the opcodes without executing any
                named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # noqa: BLE001  (not a zip checkpoint: torch.load below refuses or reads it)
                named = []
            if named:
                refuse("it names " + ", ".join(named[:3]))
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                named_code = [x.strip() for x in str(e).strip().splitlines() if "GLOBAL" in x]
                if named_code:  # the unpickler met a global the listing missed: code, refused
                    refuse(named_code[0])
                raise  # bytes that are no pickle at all are not code: "cannot read" below
    except ValueError as e:
        if str(e).startswith("refusing to load"):
            raise
        raise ValueError(f"cannot read the weights in '{path}' ({str(e).strip().splitlines()[0][:200]}); it is "
                         "truncated or not a transformers weights file: save it again with save_pretrained") from None
    except Exception as e:  # noqa: BLE001  (torch, pickle and safetensors each raise their own)
        raise ValueError(f"cannot read the weights in '{path}' ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:200]}); it is truncated or not a "
                         "transformers weights file: save it again with save_pretrained") from None
    if not isinstance(sd, dict):
        raise ValueError(f"'{path}' does not hold a state dict (a dict of tensors)")
    return sd


def layers_from_hf(sd: dict) -> tuple[dict, list[dict]]:
    sd = _strip(sd, "transformer.")
    embed = {k: sd[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    layers = []
    for i in range(n):
        layer = {}
        for hf, ours in HF_TO_BLOCK.items():
            for p in ("weight", "bias"):
                layer[f"{ours}.{p}"] = sd[f"h.{i}.{hf}.{p}"]
        layers.append(layer)
    return embed, layers


def hf_from_layers(embed: dict, layers: list[dict]) -> dict:
    """The inverse of ``layers_from_hf`` (GPT2LMHeadModel keys, lm_head tied to wte)."""
    sd = {f"transformer.{k}": v for k, v in embed.items()}
    for i, layer in enumerate(layers):
        for hf, ours in HF_TO_BLOCK.items():
            for p in ("weight", "bias"):
                sd[f"transformer.h.{i}.{hf}.{p}"] = layer[f"{ours}.{p}"]
    sd["lm_head.weight"] = embed["wte.weight"]
    return sd


def _pool_key(block_key: str) -> str:
    """``attn.qkv.weight`` -> ``qkv_weight`` (a module pool stacks its modules' tensors)."""
    return block_key.split(".", 1)[1].replace(".", "_")


def layers_from_mom(sd: dict, cfg: ModelConfig) -> tuple[dict, list[dict]]:
    """The layer list of a MoM whose chunks run the diagonal vanilla schedule (N_A = N_F = H)."""
    if not (cfg.n_attn_modules == cfg.n_ffn_modules == cfg.n_steps):
        raise ValueError("only a vanilla-schedule MoM (n_attn_modules == n_ffn_modules == n_steps) reads as "
                         "a GPT-2 layer list; this checkpoint's chunks are not a fixed layer order")
    embed = {k: sd[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}

    def block(prefix):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    layers = [block(f"bottom.{i}.") for i in range(cfg.n_bottom)]
    for c in range(cfg.n_chunks):
        for h in range(cfg.n_steps):
            layer = {}
            for kind, pool in (("attn", "attn_pool"), ("ffn", "ffn_pool")):
                for k in (ATTN_KEYS if kind == "attn" else FFN_KEYS):
                    for p in ("weight", "bias"):
                        layer[f"{k}.{p}"] = sd[f"chunks.{c}.{pool}.{_pool_key(f'{k}.{p}')}"][h]
            layers.append(layer)
        if cfg.anchor:
            layers.append(block(f"anchors.{c}."))
    layers += [block(f"top.{i}.") for i in range(cfg.n_top)]
    return embed, layers


def mom_from_layers(embed: dict, layers: list[dict], cfg: ModelConfig) -> dict:
    """MoM state-dict entries (all but the routers) built from a GPT-2 layer list."""
    if len(layers) != cfg.source_layers:
        raise ValueError(
            f"the source GPT-2 has {len(layers)} layers but this MoM layout decomposes "
            f"n_bottom + n_chunks*(max(N_A,N_F) + anchor) + n_top = {cfg.source_layers}; "
            "change model.n_bottom/n_top/n_chunks/n_*_modules/anchor to match the source depth")
    sd = dict(embed)
    it = iter(layers)
    for i in range(cfg.n_bottom):
        sd.update({f"bottom.{i}.{k}": v for k, v in next(it).items()})
    for c in range(cfg.n_chunks):
        group = [next(it) for _ in range(max(cfg.n_attn_modules, cfg.n_ffn_modules))]
        for kind, pool, n in (("attn", "attn_pool", cfg.n_attn_modules), ("ffn", "ffn_pool", cfg.n_ffn_modules)):
            for k in (ATTN_KEYS if kind == "attn" else FFN_KEYS):
                for p in ("weight", "bias"):
                    sd[f"chunks.{c}.{pool}.{_pool_key(f'{k}.{p}')}"] = torch.stack(
                        [layer[f"{k}.{p}"] for layer in group[:n]])
        if cfg.anchor:
            sd.update({f"anchors.{c}.{k}": v for k, v in next(it).items()})
    for i in range(cfg.n_top):
        sd.update({f"top.{i}.{k}": v for k, v in next(it).items()})
    return sd


def init_mom_from_gpt2(model, source, source_cfg: ModelConfig | None = None) -> None:
    """Phase-2 initialisation of ``model`` from a vanilla GPT-2: a transformers model, state dict
    or directory (``source_cfg`` None), or our own vanilla MoM state dict (pass its config)."""
    if source_cfg is not None:
        embed, layers = layers_from_mom(source if isinstance(source, dict) else source.state_dict(), source_cfg)
    else:
        embed, layers = layers_from_hf(read_hf_state_dict(source))
    sd = mom_from_layers(embed, layers, model.cfg)
    own = model.state_dict()
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise ValueError(f"shape mismatch for {k}: source {tuple(v.shape)} vs MoM {tuple(own[k].shape)}; "
                             "model.d_model, vocab_size and max_seq_len must equal the source's")
    missing = [k for k in own if k not in sd and ".attn_router." not in k and ".ffn_router." not in k]
    assert not missing, f"phase-2 init left non-router weights uninitialised: {missing[:5]}"
    model.load_state_dict(sd, strict=False)
