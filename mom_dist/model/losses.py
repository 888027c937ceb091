"""Pure loss helpers (spec §6): language modelling, load balance, router z-loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, loss_mask_BS: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token cross-entropy over unmasked positions (labels are already shifted)."""
    ce = F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), labels_BS.reshape(-1),
                         reduction="none")
    if loss_mask_BS is None:
        return ce.mean()
    mask = loss_mask_BS.reshape(-1).to(ce.dtype)
    return (ce * mask).sum() / mask.sum().clamp(min=1.0)


def balance_loss(probs_HTC: list[torch.Tensor], top1_HT: list[torch.Tensor], *, depthwise: bool,
                 double_softmax: bool) -> torch.Tensor:
    """Switch-style load balance over the C router classes: C * sum_i f_i * P_i.

    f_i is the fraction of tokens whose top-1 pick is class i, P_i the mean router probability
    of class i. ``depthwise`` computes it per routing step and averages over steps; otherwise
    all steps are pooled. ``double_softmax`` reproduces the authors' release, which applies a
    second softmax to what are already probabilities (flattening P, so a weaker loss).
    Uniform routing gives 1.0; everything on one class gives C.
    """
    C = probs_HTC[0].shape[-1]

    def one(probs_TC, top1_T):
        p = probs_TC.softmax(-1) if double_softmax else probs_TC
        f = (top1_T.unsqueeze(-1) == torch.arange(C, device=top1_T.device)).to(p.dtype).mean(0)
        return C * (f * p.mean(0)).sum()

    if depthwise:
        return torch.stack([one(p, t) for p, t in zip(probs_HTC, top1_HT)]).mean()
    return one(torch.cat(probs_HTC), torch.cat(top1_HT))


def router_z_loss(logits_HTC: list[torch.Tensor]) -> torch.Tensor:
    """Mean squared log-partition of the router scores (ST-MoE), ignoring masked classes."""
    z = torch.cat([torch.logsumexp(x, dim=-1) for x in logits_HTC])
    return (z ** 2).mean()
