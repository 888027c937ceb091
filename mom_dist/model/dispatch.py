"""Token dispatch for one routing step: plan -> dispatch -> (local module compute) -> combine.

A dispatcher moves the (token, module) pairs a router picked to where the modules live and
brings the results back. ``LocalDispatcher`` keeps everything in this process: it is the
reference that ``mom_dist.parallel.all_to_all.AllToAllDispatcher`` is tested against.

Both group the rows they hand to a pool by module with one stable sort (no per-module
``nonzero``, ``.item()`` or ``.tolist()``), so a pool runs each module on a contiguous slice,
through ``torch._grouped_mm`` where it is available (no host sync at all) or a loop over
slices (one host sync per plan, to read the slice sizes). SKIP picks never reach a module.
Under ``torch.compile`` the grouped matmuls Dynamo cannot trace run as a custom op
(``grouped_ops``), so no path breaks the graph.

Two modes:
- dropless (default): every pair is computed.
- capacity: each module takes at most ``capacity`` rows from each source (fixed buffer
  shapes, no host sync); an overflowing pair gets a zero update and is counted as dropped.
  Priority is the token order within the source micro-batch, so drops do not depend on the
  parallel layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mom_dist.host_sync import to_host_list
from mom_dist.model.grouped_ops import grouped_mm, grouped_mm_kernel_ok, loop_mm


@dataclass
class Groups:
    """Rows handed to a pool, grouped by local module (module i owns rows [ends[i-1], ends[i])).

    Padding rows (SKIP picks sorted last, empty capacity slots) have ``valid_M`` False; they are
    computed as part of the last module's slice (with zero LayerNorm affine and bias, so no
    uninitialised memory is ever read) and masked out by ``combine``.
    """

    ends_N: torch.Tensor  # (N_local,) int32 cumulative end offsets of the real rows
    module_M: torch.Tensor  # (M,) long local module id of each row (clamped for padding rows)
    valid_M: torch.Tensor | None  # (M,) bool; None when every row is a real pair
    counts_host: list[int] | None = None  # slice sizes, read once when a loop fallback needs them
    _onehot: torch.Tensor | None = None

    def sizes(self) -> list[int]:
        """Rows per module on the host (one device->host sync, cached for the plan's reuse)."""
        if self.counts_host is None:
            ends = to_host_list(self.ends_N)
            self.counts_host = [e - s for s, e in zip([0] + ends[:-1], ends)]
        return self.counts_host

    def onehot(self, dtype) -> torch.Tensor:
        """(M, N_local) row -> module indicator, zero on padding rows. Per-module vectors are
        gathered as ``onehot @ stacked`` (a GEMM whose backward is a GEMM, unlike index_select's
        scatter-add backward, which serialises on a handful of rows)."""
        if self._onehot is not None and self._onehot.dtype == dtype:
            return self._onehot
        n = self.ends_N.shape[0]
        hot = self.module_M.unsqueeze(-1) == torch.arange(n, device=self.module_M.device)
        if self.valid_M is not None:
            hot = hot & self.valid_M.unsqueeze(-1)
        hot = hot.to(dtype)
        # Compiled, the compiler shares the computation itself; and storing the cache from inside
        # activation checkpointing's region would be a side effect that breaks the graph there.
        if not torch.compiler.is_compiling():
            self._onehot = hot
        return hot

    def mm_ends(self, n_rows: int) -> torch.Tensor:
        """Group ends for a grouped GEMM over all ``n_rows`` rows (padding joins the last group)."""
        if self.valid_M is None:
            return self.ends_N
        return torch.cat([self.ends_N[:-1], self.ends_N.new_full((1,), n_rows)])


@dataclass
class LocalPlan:
    """Where each (token, slot) pair of one routing step goes, within one process."""

    n_tokens: int
    token_M: torch.Tensor  # (M,) source token of each grouped row
    pair_M: torch.Tensor  # (M,) index into the flattened (T*K) picks, to gather weights
    groups: Groups
    dropped: torch.Tensor  # () number of non-SKIP pairs that got no module (capacity overflow)


def capacity_for(n_tokens: int, top_k: int, n_modules: int, capacity_factor: float) -> int:
    """Rows each module accepts from one source: ceil(cf * T * K / N)."""
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_modules))


def slot_in_module(module_P: torch.Tensor, n_modules: int) -> torch.Tensor:
    """For pairs in token order, the 0-based arrival position of each pair at its module."""
    # (no F.one_hot: it validates its input on the host)
    one_hot = (module_P.clamp(max=n_modules).unsqueeze(-1) == torch.arange(n_modules + 1, device=module_P.device))
    one_hot = one_hot.long()
    return ((one_hot.cumsum(0) - 1) * one_hot).sum(-1)


class LocalDispatcher:
    """Dispatch within one process (no communication)."""

    def __init__(self, capacity_factor: float | None = None):
        self.capacity_factor = capacity_factor  # None: dropless

    def plan(self, ids_TK: torch.Tensor, n_modules: int) -> LocalPlan:
        """Group the picks ``ids_TK`` (values >= n_modules are SKIP) by module."""
        T, K = ids_TK.shape
        flat_P = ids_TK.reshape(-1)
        skip_P = flat_P >= n_modules
        if self.capacity_factor is None:
            key_P = torch.where(skip_P, n_modules, flat_P)
            order_M = torch.argsort(key_P, stable=True)
            counts = torch.zeros(n_modules + 1, dtype=torch.long, device=key_P.device)
            counts = counts.scatter_add_(0, key_P, torch.ones_like(key_P))[:n_modules]  # bincount syncs
            module_M = key_P[order_M]
            valid = module_M < n_modules
            groups = Groups(counts.cumsum(0).to(torch.int32), module_M.clamp(max=n_modules - 1), valid)
            return LocalPlan(T, order_M // K, order_M, groups, torch.zeros((), dtype=torch.long, device=ids_TK.device))
        cap = capacity_for(T, K, n_modules, self.capacity_factor)
        slot_P = slot_in_module(flat_P, n_modules)
        keep_P = ~skip_P & (slot_P < cap)
        # Buffer row of each kept pair; dropped and SKIP pairs write to a spill row that is cut off.
        row_P = torch.where(keep_P, flat_P.clamp(max=n_modules - 1) * cap + slot_P, n_modules * cap)
        dev = flat_P.device
        pair_M = torch.full((n_modules * cap + 1,), T * K, dtype=torch.long, device=dev)
        pair_M.scatter_(0, row_P, torch.arange(T * K, device=dev))
        pair_M = pair_M[:-1]
        valid = pair_M < T * K
        pair_M = torch.where(valid, pair_M, 0)
        module_M = torch.arange(n_modules, device=dev).repeat_interleave(cap)
        ends = (torch.arange(1, n_modules + 1, device=dev) * cap).to(torch.int32)
        groups = Groups(ends, module_M, valid, [cap] * n_modules)
        dropped = (~skip_P & ~keep_P).sum()
        return LocalPlan(T, pair_M // K, pair_M, groups, dropped)

    def dispatch(self, plan: LocalPlan, x_TD: torch.Tensor) -> torch.Tensor:
        return x_TD.index_select(0, plan.token_M)

    def combine(self, plan: LocalPlan, y_ME: torch.Tensor, weights_TK: torch.Tensor | None) -> torch.Tensor:
        return combine_local(plan, y_ME, weights_TK)


def combine_local(plan: LocalPlan, y_ME: torch.Tensor, weights_TK: torch.Tensor | None) -> torch.Tensor:
    """Sum each token's module outputs (times its pick weights, if given) -> (T, E)."""
    scale = None
    if weights_TK is not None:
        scale = weights_TK.reshape(-1).index_select(0, plan.pair_M).to(y_ME.dtype)
    if plan.groups.valid_M is not None:
        valid = plan.groups.valid_M.to(y_ME.dtype)
        scale = valid if scale is None else scale * valid
    if scale is not None:
        y_ME = y_ME * scale.unsqueeze(-1)
    out = torch.zeros(plan.n_tokens, y_ME.shape[-1], dtype=y_ME.dtype, device=y_ME.device)
    return out.index_add_(0, plan.token_M, y_ME)


def grouped_linear(x_MI: torch.Tensor, w_NIO: torch.Tensor, b_NO: torch.Tensor, groups: Groups,
                   use_grouped_mm: bool) -> torch.Tensor:
    """Row r of the output is x[r] @ w[module[r]] + b[module[r]] (padding rows: finite, masked later)."""
    dtype = torch.get_autocast_dtype(x_MI.device.type) if torch.is_autocast_enabled(x_MI.device.type) else x_MI.dtype
    x, w = x_MI.to(dtype), w_NIO.to(dtype)
    kernel = use_grouped_mm and grouped_mm_kernel_ok(x, w)
    if torch.compiler.is_compiling() and not (kernel and dtype == torch.bfloat16):
        y = grouped_mm(x, w, groups.mm_ends(x.shape[0]), kernel)  # what Dynamo cannot trace: grouped_ops.py
    elif kernel:
        y = torch._grouped_mm(x, w, offs=groups.mm_ends(x.shape[0]))
    else:
        y = loop_mm(x, w, groups.sizes())  # slice sizes read once per plan, reused by its pools
    return y + groups.onehot(dtype) @ b_NO.to(dtype)
