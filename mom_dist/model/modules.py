"""Module pools: the attention and FFN modules of one MoM chunk (spec §3).

Each module keeps its own parameters (``pool.experts[i]``), named like a GPT-2 layer so that
vanilla checkpoints map onto them directly. A pool may hold a slice of the chunk's modules
(expert parallelism): ``first`` is the global id of ``experts[0]`` and ``n_global`` the chunk's
pool size. Pools compute on rows already grouped by module (see ``dispatch.Groups``); the
module LayerNorm is split into a shared normalisation (done once per token, before dispatch)
and a per-module affine applied here.
"""

from __future__ import annotations

import torch
from torch import nn

from mom_dist.model.dispatch import Groups, grouped_linear
from mom_dist.model.layers import Linear, gelu


class AttentionModule(nn.Module):
    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.ln = nn.LayerNorm(d_model, eps=eps)
        self.qkv = Linear(d_model, 3 * d_model)
        self.proj = Linear(d_model, d_model)


class FFNModule(nn.Module):
    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.ln = nn.LayerNorm(d_model, eps=eps)
        self.fc = Linear(d_model, 4 * d_model)
        self.proj = Linear(4 * d_model, d_model)


class ModulePool(nn.Module):
    """A pool of modules of one kind; subclasses define the per-module computation."""

    module_cls: type = nn.Module

    def __init__(self, n_modules: int, d_model: int, eps: float, use_grouped_mm: bool):
        super().__init__()
        self.experts = nn.ModuleList([self.module_cls(d_model, eps) for _ in range(n_modules)])
        self.n_global = n_modules
        self.first = 0
        self.use_grouped_mm = use_grouped_mm

    def keep_slice(self, first: int, count: int) -> None:
        """Keep modules [first, first+count) only (expert parallelism applies this)."""
        self.experts = nn.ModuleList(list(self.experts)[first:first + count])
        self.first = first

    def _stack(self, path: str) -> torch.Tensor:
        sub, name = path.split(".")
        return torch.stack([getattr(getattr(m, sub), name) for m in self.experts])

    def _affine(self, xhat_MD: torch.Tensor, groups: Groups) -> torch.Tensor:
        """Per-module LayerNorm affine on rows that were normalised before dispatch."""
        hot = groups.onehot(xhat_MD.dtype)
        return xhat_MD * (hot @ self._stack("ln.weight").to(xhat_MD.dtype)) + hot @ self._stack("ln.bias").to(xhat_MD.dtype)

    def _linear(self, x_MI: torch.Tensor, sub: str, groups: Groups) -> torch.Tensor:
        return grouped_linear(x_MI, self._stack(f"{sub}.weight"), self._stack(f"{sub}.bias"), groups,
                              self.use_grouped_mm)


class AttentionPool(ModulePool):
    module_cls = AttentionModule

    def qkv(self, xhat_MD: torch.Tensor, groups: Groups) -> torch.Tensor:
        """QKV_i(LN_i(x)) for each row's module i -> (M, 3D)."""
        return self._linear(self._affine(xhat_MD, groups), "qkv", groups)

    def out(self, attn_MD: torch.Tensor, groups: Groups) -> torch.Tensor:
        """O_i(attn) for each row's module i -> (M, D)."""
        return self._linear(attn_MD, "proj", groups)


class FFNPool(ModulePool):
    module_cls = FFNModule

    def ffn(self, xhat_MD: torch.Tensor, groups: Groups) -> torch.Tensor:
        """FFN_j(x) = proj(gelu(fc(LN_j(x)))) for each row's module j -> (M, D)."""
        h = gelu(self._linear(self._affine(xhat_MD, groups), "fc", groups))
        return self._linear(h, "proj", groups)
