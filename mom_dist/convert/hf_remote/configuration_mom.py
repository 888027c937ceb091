"""transformers config of a Mixture-of-Modules model exported by mom_dist (``mom-convert to-hf``).

Written into the export directory and loaded with ``trust_remote_code=True``; it needs only
transformers (no mom_dist). ``mom`` holds the model's fields (mom_dist's ``ModelConfig``; the
defaults below mirror it, a test keeps them equal). The usual transformers names are derived
from it: ``max_position_embeddings`` (learned positions), ``hidden_size``,
``num_attention_heads``, and ``num_hidden_layers`` = the number of attentions that keep a KV
cache (bottom + chunks x routing steps + anchors + top), which is what generation's cache uses.
"""

import copy

from transformers import PretrainedConfig

ROUTER_DEFAULTS = {"kind": "gru", "dim": 256, "temperature": 0.2, "top_k": 1, "allow_skip": True,
                   "schedule": "free", "weighting": "straight_through"}
MOM_DEFAULTS = {
    "vocab_size": 50257, "max_seq_len": 1024, "d_model": 768, "n_heads": 12, "n_bottom": 2, "n_top": 1,
    "n_chunks": 1, "n_attn_modules": 4, "n_ffn_modules": 4, "n_steps": 8, "anchor": False,
    "attn_router": ROUTER_DEFAULTS, "ffn_router": ROUTER_DEFAULTS, "qkv_weighted": False,
    "mask_skip_keys": False, "dropout": 0.0, "layer_norm_eps": 1e-5, "init_std": 0.02, "balance_coef": 0.01,
    "balance_mode": "pooled", "balance_double_softmax": False, "balance_reduction": "mean",
    "router_bias": False, "z_loss_coef": 0.0, "activation_checkpointing": False, "grouped_gemm": "auto",
}
CHOICES = {"kind": ("gru", "mlp"), "schedule": ("free", "diagonal"),
           "weighting": ("straight_through", "renorm", "raw"), "balance_mode": ("pooled", "depthwise"),
           "balance_reduction": ("mean", "release")}


def _filled(given: dict, defaults: dict, where: str) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(defaults)} "
                         "(was this directory written by a newer mom_dist? re-export it)")
    out = copy.deepcopy(defaults)
    for k, v in given.items():
        out[k] = _filled(v, defaults[k], f"{where}.{k}") if isinstance(defaults[k], dict) else v
    for k, allowed in CHOICES.items():
        if k in out and out[k] not in allowed:
            raise ValueError(f"{where}.{k}={out[k]!r} is not one of {allowed}")
    return out


class MoMConfig(PretrainedConfig):
    model_type = "mom"

    def __init__(self, mom=None, **kwargs):
        m = _filled(dict(mom or {}), MOM_DEFAULTS, "mom")
        for r in ("attn_router", "ffn_router"):
            _filled(m[r], ROUTER_DEFAULTS, f"mom.{r}")
        self.mom = m
        # Derived, read by transformers/lm-eval; always recomputed from ``mom`` (never stale).
        for k in ("vocab_size", "max_position_embeddings", "hidden_size", "num_attention_heads", "num_hidden_layers"):
            kwargs.pop(k, None)
        self.vocab_size = m["vocab_size"]
        self.max_position_embeddings = m["max_seq_len"]
        self.hidden_size = m["d_model"]
        self.num_attention_heads = m["n_heads"]
        self.num_hidden_layers = m["n_bottom"] + m["n_chunks"] * (m["n_steps"] + int(m["anchor"])) + m["n_top"]
        kwargs.setdefault("tie_word_embeddings", False)  # the LM head reads wte's weight directly
        kwargs.setdefault("bos_token_id", 1)  # mom_dist tokenizers: 0 <unk>, 1 <|endoftext|>
        kwargs.setdefault("eos_token_id", 1)
        kwargs.setdefault("pad_token_id", 0)
        super().__init__(**kwargs)
