"""Greedy generation with per-routing-step KV caches (see ``cache.py``)."""

from __future__ import annotations

import torch

from mom_dist.model.cache import ModelCache


@torch.no_grad()
def generate_greedy(model, prompt_BS: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True) -> torch.Tensor:
    """Append ``max_new_tokens`` argmax tokens to ``prompt_BS``; with or without KV caches the
    result is the same (a test checks it)."""
    was_training = model.training
    model.eval()
    tokens = prompt_BS
    cache = ModelCache(model.cfg) if use_cache else None
    step_input = tokens
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(step_input, cache=cache).logits
        else:
            logits = model(tokens).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        step_input = nxt
    model.train(was_training)
    return tokens
