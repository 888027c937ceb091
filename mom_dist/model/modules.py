"""Module pools: the attention and FFN modules of one MoM chunk (spec §3).

A pool stores its N modules' weights stacked, module first: ``qkv_weight`` is (N, D, 3D),
``ln_weight`` (N, D), ... (GPT-2's ``Conv1D`` (in, out) layout per module). Grouped matmuls
consume the stacks directly, so no per-step copy of the weights is made and each module's
gradient accumulates in place. A pool may hold a slice of the chunk's modules (expert
parallelism): ``first`` is the global id of local module 0, ``n_global`` the chunk's pool size.

Pools compute on rows already grouped by module (``dispatch.Groups``); the module LayerNorm is
split into a shared normalisation (once per token, before dispatch) and a per-module affine
applied here. ``unit(i)`` gives module i as plain callables, for references and tests.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from mom_dist.model.dispatch import Groups, grouped_linear
from mom_dist.model.layers import gelu


class ModulePool(nn.Module):
    """A pool of modules of one kind; ``linears`` names its (in, out) projections."""

    linears: dict = {}

    def __init__(self, n_modules: int, d_model: int, eps: float, use_grouped_mm: bool):
        super().__init__()
        self.d_model, self.eps = d_model, eps
        self.ln_weight = nn.Parameter(torch.ones(n_modules, d_model))
        self.ln_bias = nn.Parameter(torch.zeros(n_modules, d_model))
        for name, (d_in, d_out) in self.shapes(d_model).items():
            setattr(self, f"{name}_weight", nn.Parameter(torch.empty(n_modules, d_in, d_out)))
            setattr(self, f"{name}_bias", nn.Parameter(torch.zeros(n_modules, d_out)))
        self.n_global = n_modules
        self.first = 0
        self.use_grouped_mm = use_grouped_mm

    def shapes(self, d: int) -> dict:
        raise NotImplementedError

    @property
    def n_local(self) -> int:
        return self.ln_weight.shape[0]

    def keep_slice(self, first: int, count: int) -> None:
        """Keep modules [first, first+count) only (expert parallelism applies this)."""
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(p.detach()[first:first + count].clone(), requires_grad=p.requires_grad))
        self.first = first

    def _affine(self, xhat_MD: torch.Tensor, groups: Groups) -> torch.Tensor:
        """Per-module LayerNorm affine on rows that were normalised before dispatch."""
        hot = groups.onehot(xhat_MD.dtype)
        return xhat_MD * (hot @ self.ln_weight.to(xhat_MD.dtype)) + hot @ self.ln_bias.to(xhat_MD.dtype)

    def _linear(self, x_MI: torch.Tensor, name: str, groups: Groups) -> torch.Tensor:
        return grouped_linear(x_MI, getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"), groups,
                              self.use_grouped_mm)

    def unit(self, i: int):
        """Local module i as callables ``ln`` and one per linear (reference computations)."""
        ln = lambda x: F.layer_norm(x, (self.d_model,), self.ln_weight[i], self.ln_bias[i], self.eps)  # noqa: E731
        fns = {name: (lambda x, n=name: x @ getattr(self, f"{n}_weight")[i] + getattr(self, f"{n}_bias")[i])
               for name in self.shapes(self.d_model)}
        return types.SimpleNamespace(ln=ln, **fns)


class AttentionPool(ModulePool):
    def shapes(self, d: int) -> dict:
        return {"qkv": (d, 3 * d), "proj": (d, d)}

    def qkv(self, xhat_MD: torch.Tensor, groups: Groups) -> torch.Tensor:
        """QKV_i(LN_i(x)) for each row's module i -> (M, 3D)."""
        return self._linear(self._affine(xhat_MD, groups), "qkv", groups)

    def out(self, attn_MD: torch.Tensor, groups: Groups) -> torch.Tensor:
        """O_i(attn) for each row's module i -> (M, D)."""
        return self._linear(attn_MD, "proj", groups)


class FFNPool(ModulePool):
    def shapes(self, d: int) -> dict:
        return {"fc": (d, 4 * d), "proj": (4 * d, d)}

    def ffn(self, xhat_MD: torch.Tensor, groups: Groups) -> torch.Tensor:
        """FFN_j(x) = proj(gelu(fc(LN_j(x)))) for each row's module j -> (M, D)."""
        h = gelu(self._linear(self._affine(xhat_MD, groups), "fc", groups))
        return self._linear(h, "proj", groups)
