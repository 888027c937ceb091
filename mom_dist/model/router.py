"""Routers (spec §4): per token and routing step, pick top-K of N modules + SKIP.

The GRU router keeps a per-token recurrent state across its chunk's H steps, so a pick depends
on the earlier picks; the MLP router is stateless. Scores are ``softmax((W_o h + b_o) / tau)``
(b_o: the GRU router's optional ``head_bias``, ``model.router_bias``) over
``C = max(N_A, N_F) + 1`` classes: class c < N picks module c, every other class is SKIP.
Disallowed classes (SKIP when ``allow_skip`` is off, other modules under the diagonal schedule)
get probability exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mom_dist.model.config import RouterConfig


@dataclass
class RouterOutput:
    logits_TC: torch.Tensor  # scores / tau, disallowed classes at -inf
    probs_TC: torch.Tensor
    ids_TK: torch.Tensor  # picked classes, best first; ids >= n_modules are SKIP
    weights_TK: torch.Tensor  # mixing weights of the picks
    state_TR: torch.Tensor | None  # GRU state after this step


class Router(nn.Module):
    def __init__(self, cfg: RouterConfig, d_model: int, n_classes: int, n_modules: int, bias: bool = False):
        super().__init__()
        self.cfg, self.n_classes, self.n_modules = cfg, n_classes, n_modules
        if cfg.kind == "gru":
            self.cell = nn.GRUCell(d_model, cfg.dim)
            self.head = nn.Linear(cfg.dim, n_classes, bias=False)  # W_o
            # b_o (model.router_bias): the release's output layer has one; zero at initialisation,
            # so it only matters for trained weights (imported checkpoints).
            self.head_bias = nn.Parameter(torch.zeros(n_classes)) if bias else None
        else:
            self.hidden = nn.Linear(d_model, cfg.dim)
            self.head = nn.Linear(cfg.dim, n_classes)

    def initial_state(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.kind != "gru":
            return None
        return x_TD.new_zeros(x_TD.shape[0], self.cfg.dim, dtype=self.head.weight.dtype)

    def allowed(self, step: int, device) -> torch.Tensor:
        """(C,) bool: classes this router may pick at ``step``."""
        c = torch.arange(self.n_classes, device=device)
        skip = c >= self.n_modules
        module_ok = ~skip if self.cfg.schedule == "free" else c == step % self.n_modules
        return module_ok | (skip & self.cfg.allow_skip)

    def forward(self, x_TD: torch.Tensor, state_TR: torch.Tensor | None, step: int) -> RouterOutput:
        # Router math in the router's own parameter precision, not autocast's: picks are discrete
        # and should not flip with the activation precision. Softmax in fp32.
        dtype = self.head.weight.dtype
        with torch.autocast(x_TD.device.type, enabled=False):
            if self.cfg.kind == "gru":
                state_TR = self.cell(x_TD.to(dtype), state_TR)
                scores = self.head(state_TR)
                if self.head_bias is not None:
                    scores = scores + self.head_bias
            else:
                scores = self.head(F.relu(self.hidden(x_TD.to(dtype))))
        logits = scores.float() / self.cfg.temperature
        logits = logits.masked_fill(~self.allowed(step, x_TD.device), float("-inf"))
        probs = logits.softmax(-1)
        top_p, ids = probs.topk(self.cfg.top_k, dim=-1)
        return RouterOutput(logits, probs, ids, self.mix_weights(top_p), state_TR)

    def mix_weights(self, top_p_TK: torch.Tensor) -> torch.Tensor:
        kind = self.cfg.weighting
        if kind == "raw":
            return top_p_TK
        if top_p_TK.shape[-1] == 1:
            renorm = torch.ones_like(top_p_TK)  # p/p == 1 exactly; no gradient, as in the reference
        else:
            renorm = top_p_TK / top_p_TK.sum(-1, keepdim=True)
        if kind == "renorm":
            return renorm
        # straight_through: renorm's value, the raw probabilities' gradient
        return renorm.detach() + top_p_TK - top_p_TK.detach()
