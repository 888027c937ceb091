"""What may change when a run resumes from its ``out_dir`` (checked before anything is loaded).

The checkpoint's ``mom_state.json`` records the config that wrote it. Against this run's config:

- ``model``: every field must be equal, except ``SAFE_MODEL_KEYS`` (how the same numbers are
  computed: recompute in backward, the grouped-GEMM kernel). Anything else - ``n_steps``,
  ``top_k``, router kind/schedule/weighting, ``allow_skip``, ``qkv_weighted``, dropout, loss
  coefficients... - changes what the weights mean: refused.
- ``parallel.dispatcher`` / ``parallel.capacity_factor`` (capacity mode drops pairs): refused.
- ``data`` (except paths that may move: directories of the prefixes, caches, the tokenizer,
  validation) and ``REFUSED_TRAIN_KEYS`` (the sample stream and what ``consumed_samples``
  counts; ``micro_batch_size``, because the balance and z losses are computed per micro-batch
  of that many sequences - the layout may change, the micro-batches stay the same sequences,
  and the gradient accumulation follows from global batch, micro-batch and world): refused,
  saying why.
- ``APPLIED_TRAIN_KEYS`` (the optimizer recipe and schedule): applied from the resumed step on
  and logged; ``mom_state.json`` then records what was really used.
- everything else (intervals, ``keep_last``, ``stop_after``, ``eval_batches``, the layout...):
  free.
"""

from __future__ import annotations

import os

SAFE_MODEL_KEYS = ("activation_checkpointing", "grouped_gemm")
REFUSED_TRAIN_KEYS = {  # key -> why changing it changes the computation
    "seed": "the order of the samples",
    "global_batch_size": "the samples of each step and what consumed_samples counts",
    "seq_len": "the samples",
    "optimizer": "the optimizer state",
    "micro_batch_size": "the balance and z losses, computed per micro-batch",
}
APPLIED_TRAIN_KEYS = ("lr", "min_lr_ratio", "warmup_steps", "steps", "betas", "eps", "weight_decay", "grad_clip")
REFUSED_PARALLEL_KEYS = ("dispatcher", "capacity_factor")
DATA_FREE_KEYS = ("cache_dir", "cache_shared", "tokenizer_model", "valid_prefixes", "valid_weights")


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def _diff(old: dict, new: dict, prefix: str) -> list[tuple[str, object, object]]:
    a, b = _flat(old, prefix), _flat(new, prefix)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _show(changes) -> str:
    return ", ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in changes)


def check_resume(cfg, saved_config: dict, where: str) -> list[tuple[str, object, object]]:
    """Refuse (ValueError) a resume that changes the computation; return the recipe changes
    that will be applied, as (key, checkpoint value, new value)."""
    from mom_dist.config_utils import from_dict, to_dict
    from mom_dist.model.config import ModelConfig

    try:  # fill fields added since the checkpoint was written with their defaults
        saved_model = to_dict(from_dict(ModelConfig, saved_config.get("model", {}), "model."))
    except ValueError as e:
        raise ValueError(f"{where} was written by another mom_dist version ({e}); use a new train.out_dir") from None
    model = [c for c in _diff(saved_model, to_dict(cfg.model), "model.")
             if c[0].split(".")[1] not in SAFE_MODEL_KEYS]
    if model:
        raise ValueError(f"{where} holds checkpoints of a different model ({_show(model)}); resuming would change "
                         "what its weights compute. Use a new train.out_dir (train.init_from=<this run> starts "
                         "from its weights) or set the checkpoint's values back")
    old_p, new_p = saved_config.get("parallel", {}), to_dict(cfg.parallel)
    refused = [(f"parallel.{k}", old_p.get(k), new_p[k]) for k in REFUSED_PARALLEL_KEYS
               if k in old_p and old_p[k] != new_p[k]]
    if refused and refused[0][0] == "parallel.capacity_factor" and new_p["dispatcher"] == "dropless":
        refused = []  # the capacity factor is unused by the dropless dispatcher
    old_t, new_t = saved_config.get("train", {}), to_dict(cfg.train)
    refused += [(f"train.{k}", old_t.get(k), new_t[k]) for k in REFUSED_TRAIN_KEYS
                if k in old_t and old_t[k] != new_t[k]]
    old_d, new_d = _data_identity(saved_config.get("data") or {}), _data_identity(cfg.data)
    refused += _diff(old_d, new_d, "data.")
    if refused:
        why = sorted({REFUSED_TRAIN_KEYS[k[6:]] for k, _, _ in refused if k[6:] in REFUSED_TRAIN_KEYS
                      and k.startswith("train.")})
        raise ValueError(f"cannot resume {where} with a changed sample stream or routing ({_show(refused)}"
                         + (f"; they decide {', '.join(why)}" if why else "") + "): the continuation would not be "
                         "the run it continues. Set them back, or start a new train.out_dir with "
                         "train.init_from=<this run>")
    return [(f"train.{k}", _norm(old_t.get(k)), _norm(new_t[k])) for k in APPLIED_TRAIN_KEYS
            if k in old_t and _norm(old_t[k]) != _norm(new_t[k])]


def _data_identity(data: dict) -> dict:
    """The data settings that decide the training sample stream; paths may move (same file names)."""
    out = {k: v for k, v in data.items() if k not in DATA_FREE_KEYS}
    if "train_prefixes" in out:
        prefixes = out["train_prefixes"]
        out["train_prefixes"] = [os.path.basename(str(p)) for p in ([prefixes] if isinstance(prefixes, str) else prefixes)]
    return out


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v
