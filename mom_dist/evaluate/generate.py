"""Batched greedy decoding of prompts of different lengths with a plain ``MoMModel``.

Prompts are left-padded to one length; padded keys are masked (``attention_mask_BSL``) and
positions count real tokens only, so each row decodes as it would alone (a test compares with
``mom_dist.model.generate.generate_greedy`` on each prompt unpadded). One KV cache per routing
step (``ModelCache``); a row stops at the end-of-document id.
"""

from __future__ import annotations

import torch

from mom_dist.model.cache import ModelCache


@torch.no_grad()
def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, eod: int, device="cpu") -> list[list[int]]:
    """The generated continuation of each prompt (without the prompt, cut before EOD)."""
    model.eval()
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {P} tokens + {max_new_tokens} new ones exceeds model.max_seq_len="
                         f"{model.cfg.max_seq_len}")
    tokens = torch.full((B, P), eod, dtype=torch.long, device=device)
    valid_BL = torch.zeros(B, P, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        valid_BL[i, P - len(p):] = True
    pos_BS = (valid_BL.long().cumsum(-1) - 1).clamp(min=0)
    cache = ModelCache(model.cfg)
    out = model(tokens, position_ids_BS=pos_BS, attention_mask_BSL=~valid_BL[:, None, :].expand(B, P, P), cache=cache)
    nxt = out.logits[:, -1].argmax(-1)
    generated, done = [], torch.zeros(B, dtype=torch.bool, device=device)
    last_pos = pos_BS[:, -1]
    for step in range(max_new_tokens):
        generated.append(nxt)
        done |= nxt == eod
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        valid_BL = torch.cat([valid_BL, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
        last_pos = last_pos + 1
        out = model(nxt[:, None], position_ids_BS=last_pos[:, None], attention_mask_BSL=~valid_BL[:, None, :],
                    cache=cache)
        nxt = out.logits[:, -1].argmax(-1)
    rows = torch.stack(generated, 1).tolist()
    return [r[:r.index(eod)] if eod in r else r for r in rows]
