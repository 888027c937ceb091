"""Import the authors' release checkpoints (``GPT2MoTLMHeadModel`` saved with ``save_pretrained``).

The release (gzhch/Mixture-of-Modules) stores one ``transformer.h.{i}`` entry per layer in
computation order - B bottom layers, then for each chunk its MoM block (and, with
``require_anchor_layer``, an anchor layer), then T top layers - with GPT-2 ``Conv1D`` weights
(``(in, out)``, our layout too):

    dense layer  h.{i}.mot_attn.attention_layernorm.*   -> attn.ln.*
                 h.{i}.mot_attn.c_attn.* / c_proj.*     -> attn.qkv.* / attn.proj.*
                 h.{i}.mot_ffn.ffn_layernorm.*          -> ffn.ln.*
                 h.{i}.mot_ffn.c_fc.* / c_proj.*        -> ffn.fc.* / ffn.proj.*
    MoM block    the same names with a module index (``c_attn.{m}.weight``), stacked into the
                 chunk's pools (``chunks.{c}.attn_pool.qkv_weight[m]``, ...)
    GRU router   h.{i}.mot_{attn,ffn}.router.x2h / h2h  -> {attn,ffn}_router.cell.weight_ih / _hh
                                                           (+ bias_ih / bias_hh; gate order r, z, n
                                                           in both, and the same cell equations)
                 h.{i}.mot_{attn,ffn}.router.router     -> head.weight + head_bias (router_bias)
    MLP router   router.router.0 / router.router.2      -> hidden / head ("naive" router type; the
                                                           release tests "naive" before "gru", so
                                                           a router_type with both is an MLP router)

The imported model uses the release's numerics: renormalised top-K weights, its balance loss
(second softmax, attention + FFN summed, pooled across chunks or depthwise) with its
coefficient (0 when ``output_router_logits`` is false: the release then computes no aux loss and
trains without it, so the import does too). Settings the release offers but our model does not
compute the same way (straight-through sign weights, all-path routing, perturbed GRU routers,
no SKIP class, single-module pools, untied LM head) are refused with a message, never
approximated.
"""

from __future__ import annotations

import json
import os

import torch

from mom_dist.model.config import ModelConfig, RouterConfig

ARCHITECTURE = "GPT2MoTLMHeadModel"
DENSE = {"mot_attn.attention_layernorm": "attn.ln", "mot_attn.c_attn": "attn.qkv", "mot_attn.c_proj": "attn.proj",
         "mot_ffn.ffn_layernorm": "ffn.ln", "mot_ffn.c_fc": "ffn.fc", "mot_ffn.c_proj": "ffn.proj"}
POOLED = {"mot_attn.attention_layernorm": ("attn_pool", "ln"), "mot_attn.c_attn": ("attn_pool", "qkv"),
          "mot_attn.c_proj": ("attn_pool", "proj"), "mot_ffn.ffn_layernorm": ("ffn_pool", "ln"),
          "mot_ffn.c_fc": ("ffn_pool", "fc"), "mot_ffn.c_proj": ("ffn_pool", "proj")}
GRU = {"x2h.weight": "cell.weight_ih", "x2h.bias": "cell.bias_ih", "h2h.weight": "cell.weight_hh",
       "h2h.bias": "cell.bias_hh", "router.weight": "head.weight", "router.bias": "head_bias"}
MLP = {"router.0.weight": "hidden.weight", "router.0.bias": "hidden.bias", "router.2.weight": "head.weight",
       "router.2.bias": "head.bias"}
# Non-persistent attention buffers that old transformers versions still wrote.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "mot_attn.bias", "mot_attn.masked_bias")


def _need(rc: dict, key: str, default=None):
    if key not in rc and default is None:
        raise ValueError(f"the release config lacks '{key}'; is this a GPT2MoTLMHeadModel directory?")
    return rc.get(key, default)


def config_from_release(rc: dict) -> ModelConfig:
    """Our ``ModelConfig`` for a release ``config.json``; unsupported settings raise ``ValueError``."""
    archs = rc.get("architectures") or []
    if ARCHITECTURE not in archs:
        raise ValueError(f"config.json describes architecture {archs or rc.get('model_type')!r}, not the release's "
                         f"{ARCHITECTURE}; a stock GPT-2 goes through `mom-convert from-hf`")
    rtype = str(_need(rc, "router_type"))
    kind = router_kind(rtype)
    if "softmax" not in rtype or kind is None or (kind == "gru" and any(w in rtype for w in ("random", "dev", "pgru"))):
        raise ValueError(f"router_type={rtype!r} is not supported: only the softmax GRU ('gru_softmax') and MLP "
                         "('naive_softmax') routers compute like ours")
    d = int(_need(rc, "n_embd"))
    n_a, n_f = int(_need(rc, "num_attn")), int(_need(rc, "num_ffn"))
    unsupported = [
        (rc.get("use_ste", False), "use_ste=true (sign straight-through weights)"),
        (rc.get("routing_all_possible_path", False), "routing_all_possible_path=true (every module on every token)"),
        (not rc.get("enable_pause", True), "enable_pause=false (no SKIP class)"),
        (min(n_a, n_f) < 2, f"num_attn={n_a}/num_ffn={n_f} (a single-module pool is an unrouted layer there)"),
        (rc.get("n_inner") not in (None, 4 * d), f"n_inner={rc.get('n_inner')} (our FFN width is 4 x n_embd)"),
        (rc.get("activation_function", "gelu_new") != "gelu_new",
         f"activation_function={rc.get('activation_function')!r} (ours is gelu_new)"),
        (not rc.get("scale_attn_weights", True), "scale_attn_weights=false"),
        (rc.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true"),
        (not rc.get("tie_word_embeddings", True), "tie_word_embeddings=false (our LM head is the token embedding)"),
        (kind == "mlp" and n_f < n_a, f"a naive router with num_ffn={n_f} < num_attn={n_a} (its classes differ)"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ValueError(f"the release checkpoint uses {what}, which mom_dist does not compute the same way; "
                             "it cannot be imported exactly")
    steps = rc.get("depth_per_chunk")
    steps = int(steps) if steps is not None else int(n_f * float(_need(rc, "depth_multiplier")))
    n_classes = max(n_a, n_f) + 1
    router = dict(kind=kind, dim=int(_need(rc, "router_dim")),
                  temperature=float(rc.get("router_softmax_temperature", 1.0)),
                  top_k=min(int(rc.get("routing_top_k", 1)), n_classes), weighting="renorm")
    drops = {float(rc.get(k, 0.1)) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    cfg = ModelConfig(
        vocab_size=int(_need(rc, "vocab_size")), max_seq_len=int(_need(rc, "n_positions")), d_model=d,
        n_heads=int(_need(rc, "n_head")), n_bottom=int(_need(rc, "num_bottom_layers")),
        n_top=int(_need(rc, "num_top_layers")), n_chunks=int(_need(rc, "chunks")), n_attn_modules=n_a,
        n_ffn_modules=n_f, n_steps=steps, anchor=bool(rc.get("require_anchor_layer", True)),
        attn_router=RouterConfig(**router), ffn_router=RouterConfig(**router),
        qkv_weighted=bool(rc.get("weighted_qkv", False)), dropout=max(drops),
        layer_norm_eps=float(rc.get("layer_norm_epsilon", 1e-5)), init_std=float(rc.get("initializer_range", 0.02)),
        # output_router_logits=false: the release returns no aux_loss and trains without one
        balance_coef=float(rc.get("router_aux_loss_coef", 0.01)) if rc.get("output_router_logits", True) else 0.0,
        balance_mode="depthwise" if rc.get("depthwise_bal_loss", False) else "pooled",
        balance_double_softmax=True, balance_reduction="release", router_bias=router["kind"] == "gru",
        z_loss_coef=0.0)
    cfg.validate()
    return cfg


def router_kind(router_type: str) -> str | None:
    """The router the release builds for ``router_type``: its ``get_router`` and both module
    forwards test "naive" first (an MLP ``TokenRouter``, which ignores "random"/"dev"), then
    "gru". So "naive_gru_softmax" is an MLP router. None: neither."""
    if "naive" in router_type:
        return "mlp"
    return "gru" if "gru" in router_type else None


def _layer_kinds(cfg: ModelConfig) -> list[tuple[str, int]]:
    """(our prefix kind, index) of each release layer ``h.{i}`` in order."""
    kinds = [("bottom", i) for i in range(cfg.n_bottom)]
    for c in range(cfg.n_chunks):
        kinds.append(("chunk", c))
        if cfg.anchor:
            kinds.append(("anchor", c))
    return kinds + [("top", i) for i in range(cfg.n_top)]


def state_dict_from_release(sd: dict, cfg: ModelConfig) -> dict:
    """Our plain state dict from a release state dict; every release tensor is used exactly once."""
    src = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in sd.items()}
    src = {k: v for k, v in src.items() if not k.endswith(IGNORED_SUFFIXES)}
    used: set = set()

    def take(key):
        if key not in src:
            raise ValueError(f"the release checkpoint lacks '{key}' (expected from its config.json); it is truncated "
                             "or its config does not match its weights")
        used.add(key)
        return src[key]

    out = {"wte.weight": take("wte.weight"), "wpe.weight": take("wpe.weight"),
           "ln_f.weight": take("ln_f.weight"), "ln_f.bias": take("ln_f.bias")}
    if "lm_head.weight" in src:
        if not torch.equal(take("lm_head.weight"), out["wte.weight"]):
            raise ValueError("the release checkpoint's lm_head.weight differs from transformer.wte.weight; mom_dist "
                             "ties the LM head to the token embedding, so it cannot be imported exactly")
    router_map = GRU if cfg.attn_router.kind == "gru" else MLP
    for i, (kind, j) in enumerate(_layer_kinds(cfg)):
        pre = f"h.{i}."
        if kind != "chunk":
            ours = {"bottom": f"bottom.{j}.", "anchor": f"anchors.{j}.", "top": f"top.{j}."}[kind]
            for rel, mine in DENSE.items():
                for p in ("weight", "bias"):
                    out[f"{ours}{mine}.{p}"] = take(f"{pre}{rel}.{p}")
            continue
        for rel, (pool, name) in POOLED.items():
            n = cfg.n_attn_modules if pool == "attn_pool" else cfg.n_ffn_modules
            for p in ("weight", "bias"):
                parts = [take(f"{pre}{rel}.{m}.{p}") for m in range(n)]
                if len({tuple(t.shape) for t in parts}) > 1:
                    raise ValueError(f"shape mismatch among the modules of transformer.{pre}{rel}.*.{p}: "
                                     f"{[tuple(t.shape) for t in parts]}")
                out[f"chunks.{j}.{pool}.{name}_{p}"] = torch.stack(parts)
        for side in ("attn", "ffn"):
            for rel, mine in router_map.items():
                out[f"chunks.{j}.{side}_router.{mine}"] = take(f"{pre}mot_{side}.router.{rel}")
    extra = sorted(set(src) - used)
    if extra:
        raise ValueError(f"the release checkpoint holds {len(extra)} weights its config.json does not account for "
                         f"(e.g. {extra[:3]}); check num_bottom_layers/chunks/num_top_layers/require_anchor_layer")
    return out


def read_release(src: str) -> tuple[dict, dict]:
    """(config.json as a dict, state dict) of a release ``save_pretrained`` directory."""
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isdir(src):
        raise ValueError(f"'{src}' is not a directory: pass the directory GPT2MoTLMHeadModel.save_pretrained wrote")
    if not os.path.exists(cfg_path):
        raise ValueError(f"'{src}' holds no config.json: pass the directory GPT2MoTLMHeadModel.save_pretrained wrote")
    try:
        with open(cfg_path) as f:
            rc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"'{cfg_path}' is not valid JSON ({e})")
    st, binf = os.path.join(src, "model.safetensors"), os.path.join(src, "pytorch_model.bin")
    if not (os.path.exists(st) or os.path.exists(binf)):
        raise ValueError(f"'{src}' holds neither model.safetensors nor pytorch_model.bin (sharded checkpoints: "
                         "merge them with transformers' save_pretrained(max_shard_size='100GB') first)")
    from mom_dist.convert.gpt2 import read_weights_file

    sd = read_weights_file(st if os.path.exists(st) else binf)  # no code runs from the file
    return rc, sd


def load_release(src: str) -> tuple[ModelConfig, dict]:
    """(our model config, our fp32 state dict) of a release checkpoint, every shape checked
    against the model its config describes (``mom-convert from-release`` writes them as an
    exported directory)."""
    from mom_dist.model import MoMModel

    rc, sd = read_release(src)
    cfg = config_from_release(rc)
    ours = state_dict_from_release(sd, cfg)
    with torch.device("meta"):
        want = MoMModel(cfg).state_dict()
    for k, v in want.items():
        if tuple(ours[k].shape) != tuple(v.shape):
            raise ValueError(f"shape mismatch for {k}: the release checkpoint has {tuple(ours[k].shape)}, its "
                             f"config.json implies {tuple(v.shape)}")
    assert set(ours) == set(want), sorted(set(ours) ^ set(want))[:5]
    return cfg, {k: v.float() for k, v in ours.items()}
