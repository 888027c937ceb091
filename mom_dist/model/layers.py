"""GPT-2 building blocks shared by the dense layers and the module pools.

Shape legend for tensor-name suffixes used across ``mom_dist.model``:
    B batch, S sequence (queries), L keys (cached + current), T tokens (= B*S), D model width,
    F feed-forward width (4D), K top-k, M dispatched rows, N modules, C router classes.

Weights are stored ``(in, out)`` like GPT-2's ``Conv1D`` so that checkpoints map 1:1 and a
pool's weights stack into ``(N, in, out)`` for grouped matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x @ weight + bias with ``weight`` of shape (in, out) (GPT-2 ``Conv1D`` layout)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t(), self.bias)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # GPT-2's "gelu_new"


def causal_attention(q_BSD: torch.Tensor, k_BLD: torch.Tensor, v_BLD: torch.Tensor, n_heads: int, *,
                     key_keep_BL: torch.Tensor | None = None, attn_mask_BSL: torch.Tensor | None = None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Causal multi-head softmax attention of S queries over L = past + S keys.

    The S queries are the last S positions of the L keys. ``key_keep_BL`` (True = may be
    attended) drops keys; ``attn_mask_BSL`` (True = masked, megatron convention) adds a
    per-document or padding mask. A token's own key is always kept. Returns (B, S, D).
    """
    B, S, D = q_BSD.shape
    L = k_BLD.shape[1]
    hd = D // n_heads
    q = q_BSD.view(B, S, n_heads, hd).transpose(1, 2)
    k = k_BLD.view(B, L, n_heads, hd).transpose(1, 2)
    v = v_BLD.view(B, L, n_heads, hd).transpose(1, 2)
    if key_keep_BL is None and attn_mask_BSL is None:
        if S == L:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif S == 1:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal(S, L, q.device)[None, None],
                                                 dropout_p=dropout_p)
    else:
        # A token may always see its own key: a fully masked row (a padding query, an all-SKIP
        # token) would otherwise give NaN, which survives a zero loss mask (NaN * 0).
        own = torch.zeros(S, L, dtype=torch.bool, device=q.device)
        own[torch.arange(S, device=q.device), torch.arange(L - S, L, device=q.device)] = True
        allow = _causal(S, L, q.device)[None].expand(B, S, L)
        if key_keep_BL is not None:
            allow = allow & key_keep_BL[:, None, :]
        if attn_mask_BSL is not None:
            allow = allow & ~attn_mask_BSL
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=(allow | own)[:, None], dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(B, S, D)


def _causal(S: int, L: int, device) -> torch.Tensor:
    """(S, L) bool, True where query i (absolute position L-S+i) may see key j."""
    return torch.ones(S, L, dtype=torch.bool, device=device).tril(diagonal=L - S)


class Attention(nn.Module):
    """GPT-2 attention sub-layer (LayerNorm, fused QKV, causal attention, output projection)."""

    def __init__(self, d_model: int, n_heads: int, eps: float, dropout: float):
        super().__init__()
        self.ln = nn.LayerNorm(d_model, eps=eps)
        self.qkv = Linear(d_model, 3 * d_model)
        self.proj = Linear(d_model, d_model)
        self.n_heads, self.dropout = n_heads, dropout

    def forward(self, x_BSD, cache=None, attn_mask_BSL=None):
        qkv = self.qkv(self.ln(x_BSD))
        q, k, v = qkv.split(x_BSD.shape[-1], dim=-1)
        if cache is not None:
            k, v, _ = cache.append(k, v, None)
        p = self.dropout if self.training else 0.0
        a = causal_attention(q, k, v, self.n_heads, attn_mask_BSL=attn_mask_BSL, dropout_p=p)
        return F.dropout(self.proj(a), p, self.training)


class FeedForward(nn.Module):
    """GPT-2 MLP sub-layer: LayerNorm, D -> 4D, GELU (tanh), 4D -> D."""

    def __init__(self, d_model: int, eps: float, dropout: float):
        super().__init__()
        self.ln = nn.LayerNorm(d_model, eps=eps)
        self.fc = Linear(d_model, 4 * d_model)
        self.proj = Linear(4 * d_model, d_model)
        self.dropout = dropout

    def forward(self, x_BSD):
        return F.dropout(self.proj(gelu(self.fc(self.ln(x_BSD)))), self.dropout, self.training)


class Block(nn.Module):
    """An ordinary pre-LN GPT-2 block (bottom, anchor and top layers)."""

    def __init__(self, d_model: int, n_heads: int, eps: float, dropout: float):
        super().__init__()
        self.attn = Attention(d_model, n_heads, eps, dropout)
        self.ffn = FeedForward(d_model, eps, dropout)

    def forward(self, x_BSD, cache=None, attn_mask_BSL=None):
        x_BSD = x_BSD + self.attn(x_BSD, cache, attn_mask_BSL)
        return x_BSD + self.ffn(x_BSD)


def init_gpt2_(module: nn.Module, std: float, n_residual_layers: int) -> None:
    """GPT-2 initialisation: N(0, std) weights, zero biases, output projections scaled by
    1/sqrt(2 * residual layers) (GPT-2 paper §2.3)."""
    for name, p in module.named_parameters():
        if name.endswith(("ln.weight", "ln_f.weight", "ln_weight")):
            nn.init.ones_(p)
        elif name.endswith(("bias", "bias_ih", "bias_hh")):
            nn.init.zeros_(p)
        elif name.endswith(("proj.weight", "proj_weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * max(1, n_residual_layers)))
        else:
            nn.init.normal_(p, 0.0, std)
