"""All-to-all token dispatch across an expert-parallel group (spec §5, §9).

Same interface as ``mom_dist.model.dispatch.LocalDispatcher`` (plan -> dispatch -> pool
compute -> combine) and tested against it. Rank e of an EP group of size E owns modules
[e*N/E, (e+1)*N/E) of each pool.

Dropless plan (one per attention sub-layer, reused by its output projection; one per FFN):
  1. count, per destination rank, the distinct tokens that picked one of its modules and the
     (token, module) pairs per local module; exchange these counts (one small all-to-all);
     read them on the host (the plan's single host sync: all_to_all needs split sizes);
  2. send pair metadata (local module, row of the token in the sender's chunk);
  3. ``dispatch`` sends each token once per destination rank, however many of that rank's
     modules it picked; the receiver expands tokens to pairs and groups them by module;
  4. ``combine`` weights each pair on the expert rank (the pick weights travel with the pairs),
     sums a token's pairs there, sends one row per token back, and sums over ranks.
SKIP picks never travel. Backward is the reverse all-to-all.

Every exchange goes through one custom op, ``mom_dist::all_to_all`` (differentiable, with a
fake implementation), so ``torch.compile`` keeps a routing step in one graph; the dropless
plan's host read of the counts is traced as unbacked sizes (``mom_dist.model.compile``).

Capacity plan: every source fills fixed (N, capacity) buffers exactly as the local capacity
dispatcher does, so drops are identical to one process; buffers travel with equal splits and
no host sync. Pairs (not distinct tokens) travel in this mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from mom_dist.host_sync import to_host_list
from mom_dist.model.dispatch import Groups, LocalDispatcher, LocalPlan, combine_local


@torch.library.custom_op("mom_dist::all_to_all", mutates_args=(),  # schema spelled out: same on every torch
                         schema="(Tensor x, SymInt[]? out_splits, SymInt[]? in_splits, str group_name) -> Tensor")
def all_to_all(x: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None,
               group_name: str) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` (rows of ``x``; None: equal splits). A custom op so
    that ``torch.compile`` keeps it in the graph as one opaque call: its output shape is known
    from the splits (``register_fake``), its backward sends gradients back the same way."""
    return _a2a(x, out_splits, in_splits, _resolve_process_group(group_name))


@all_to_all.register_fake
def _(x, out_splits, in_splits, group_name):
    return x.new_empty((sum(out_splits) if out_splits is not None else x.shape[0],) + tuple(x.shape[1:]))


def _a2a_setup(ctx, inputs, output):
    _, ctx.out_splits, ctx.in_splits, ctx.group_name = inputs


def _a2a_backward(ctx, grad):
    return all_to_all(grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group_name), None, None, None


all_to_all.register_autograd(_a2a_backward, setup_context=_a2a_setup)


def _a2a(x: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    rows = sum(out_splits) if out_splits is not None else x.shape[0]
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


@dataclass
class DroplessPlan:
    n_tokens: int
    send_token_S: torch.Tensor  # (S,) local token of each sent row, destination-major
    send_pair_order: torch.Tensor  # (Ps,) flattened pick index of each sent pair, in send order
    token_splits_out: list[int]  # rows sent to each rank
    token_splits_in: list[int]  # rows received from each rank
    pair_splits_out: list[int]
    pair_splits_in: list[int]
    row_M: torch.Tensor  # (M,) received token row of each grouped pair
    order_M: torch.Tensor  # (M,) received pair index of each grouped pair
    groups: Groups
    dropped: torch.Tensor


@dataclass
class CapacityPlan:
    local: LocalPlan  # the source-side buffer layout (rows grouped by global module)
    groups: Groups  # received rows by local module; valid_M marks the rows that hold a real pair
    n_local: int
    cap: int

    @property
    def dropped(self):
        return self.local.dropped


class AllToAllDispatcher:
    def __init__(self, group, ep_size: int, ep_rank: int, capacity_factor: float | None = None):
        self.group, self.E, self.rank = group, ep_size, ep_rank
        self.group_name = group.group_name  # how the all-to-all op names its group
        self.capacity_factor = capacity_factor
        # Payload bytes this rank sent to other ranks (telemetry; the reader resets it). A host
        # tensor, not an int: torch.compile would guard on an int's value and recompile every step.
        self._bytes_sent = torch.zeros((), dtype=torch.long)

    # ------------------------------------------------------------------ plans
    def plan(self, ids_TK: torch.Tensor, n_modules: int):
        if self.capacity_factor is not None:
            return self._capacity_plan(ids_TK, n_modules)
        return self._dropless_plan(ids_TK, n_modules)

    def _dropless_plan(self, ids_TK, n_modules) -> DroplessPlan:
        T, K = ids_TK.shape
        E, dev = self.E, ids_TK.device
        n_local = n_modules // E
        flat = ids_TK.reshape(-1)
        skip = flat >= n_modules
        dst_P = torch.where(skip, E, flat // n_local)  # E = nowhere
        lmod_P = torch.where(skip, 0, flat % n_local)
        tok_P = torch.arange(T * K, device=dev) // K
        # Distinct (destination, token) pairs: each token travels once per destination rank.
        present = torch.zeros(T, E + 1, dtype=torch.bool, device=dev)
        present[tok_P, dst_P] = True
        present_ET = present[:, :E].t()
        tok_counts = present_ET.sum(1)
        big = E * T
        key = torch.where(present_ET, torch.arange(big, device=dev).view(E, T), big).reshape(-1)
        send_order = torch.argsort(key, stable=True)  # sent rows first, destination-major
        slot = torch.empty(big, dtype=torch.long, device=dev)
        slot[send_order] = torch.arange(big, device=dev)  # row of (dst, t) in the send buffer
        tok_start = tok_counts.cumsum(0) - tok_counts
        # Pairs, sorted by (destination, local module), each pointing at its token's row.
        pair_key = torch.where(skip, E * n_local, dst_P * n_local + lmod_P)
        pair_order = torch.argsort(pair_key, stable=True)
        pair_counts = torch.zeros(E * n_local + 1, dtype=torch.long, device=dev)
        pair_counts.scatter_add_(0, pair_key, torch.ones_like(pair_key))
        pair_counts = pair_counts[:-1].view(E, n_local)
        # Exchange counts: per destination [distinct tokens, pairs for each of its modules].
        counts_out = torch.cat([tok_counts.view(E, 1), pair_counts], 1)
        counts_in = all_to_all(counts_out, None, None, self.group_name)
        host = to_host_list(torch.stack([counts_out, counts_in]))  # the plan's one host sync
        tok_out = [row[0] for row in host[0]]
        tok_in = [row[0] for row in host[1]]
        pair_out = [sum(row[1:]) for row in host[0]]
        pair_in = [sum(row[1:]) for row in host[1]]
        n_send, n_pairs = sum(tok_out), sum(pair_out)
        # Compiled, the counts are unbacked sizes: tell the compiler their ranges (eagerly: no-ops).
        for count in (c for side in host for row in side for c in row):
            torch._check(count >= 0)
        torch._check(n_send <= big)
        torch._check(n_pairs <= T * K)
        send_token = (send_order[:n_send] % T)
        pair_order = pair_order[:n_pairs]
        p_dst = dst_P[pair_order]
        row_in_chunk = slot[p_dst * T + tok_P[pair_order]] - tok_start[p_dst]
        meta = torch.stack([lmod_P[pair_order], row_in_chunk], 1).to(torch.int32)  # int32: half the control bytes
        meta_in = all_to_all(meta, pair_in, pair_out, self.group_name).long()
        # Received pairs: which source chunk each came from -> global row in the received tokens.
        # (Offsets come from counts_in on the device: no host->device copies, which would sync a GPU.)
        tok_in_dev, pair_in_dev = counts_in[:, 0], counts_in[:, 1:].sum(1)
        src = torch.searchsorted(pair_in_dev.cumsum(0), torch.arange(sum(pair_in), device=dev), right=True)
        row = meta_in[:, 1] + (tok_in_dev.cumsum(0) - tok_in_dev)[src]
        order_M = torch.argsort(meta_in[:, 0], stable=True)
        per_module = [sum(host[1][s][1 + m] for s in range(E)) for m in range(n_local)]
        ends = counts_in[:, 1:].sum(0).cumsum(0).to(torch.int32)
        groups = Groups(ends, meta_in[:, 0][order_M], None, per_module)
        return DroplessPlan(T, send_token, pair_order, tok_out, tok_in, pair_out, pair_in,
                            row[order_M], order_M, groups, torch.zeros((), dtype=torch.long, device=dev))

    def _capacity_plan(self, ids_TK, n_modules) -> CapacityPlan:
        local = LocalDispatcher(self.capacity_factor).plan(ids_TK, n_modules)
        n_local = n_modules // self.E
        cap = local.groups.counts_host[0]
        valid = local.groups.valid_M.to(torch.uint8)
        valid_in = all_to_all(valid, None, None, self.group_name).bool()
        # Received buffer is (source, local module, cap); group it by local module.
        valid_in = valid_in.view(self.E, n_local, cap).transpose(0, 1).reshape(-1)
        ends = (torch.arange(1, n_local + 1, device=ids_TK.device) * self.E * cap).to(torch.int32)
        module_M = torch.arange(n_local, device=ids_TK.device).repeat_interleave(self.E * cap)
        groups = Groups(ends, module_M, valid_in, [self.E * cap] * n_local)
        return CapacityPlan(local, groups, n_local, cap)

    # ------------------------------------------------------------ dispatch/combine
    def dispatch(self, plan, x_TD: torch.Tensor) -> torch.Tensor:
        if isinstance(plan, CapacityPlan):
            buf = x_TD.index_select(0, plan.local.token_M)  # empty slots carry token 0's row, masked at combine
            self._count(buf, buf.shape[0] // self.E)
            recv = all_to_all(buf, None, None, self.group_name)
            D = x_TD.shape[-1]
            return recv.view(self.E, plan.n_local, plan.cap, D).transpose(0, 1).reshape(-1, D)
        send = x_TD.index_select(0, plan.send_token_S)
        self._count(send, plan.token_splits_out[self.rank])
        recv = all_to_all(send, plan.token_splits_in, plan.token_splits_out, self.group_name)
        return recv.index_select(0, plan.row_M)

    def combine(self, plan, y_ME: torch.Tensor, weights_TK: torch.Tensor | None) -> torch.Tensor:
        if isinstance(plan, CapacityPlan):
            E_ = y_ME.shape[-1]
            y = y_ME.view(plan.n_local, self.E, plan.cap, E_).transpose(0, 1).reshape(-1, E_)
            self._count(y, y.shape[0] // self.E)
            back = all_to_all(y, None, None, self.group_name)
            return combine_local(plan.local, back, weights_TK)
        if weights_TK is not None:
            w = weights_TK.reshape(-1).index_select(0, plan.send_pair_order).to(y_ME.dtype)
            self._count(w, plan.pair_splits_out[self.rank])
            w_in = all_to_all(w, plan.pair_splits_in, plan.pair_splits_out, self.group_name)
            y_ME = y_ME * w_in.index_select(0, plan.order_M).unsqueeze(-1)
        rows = torch.zeros(sum(plan.token_splits_in), y_ME.shape[-1], dtype=y_ME.dtype, device=y_ME.device)
        rows = rows.index_add(0, plan.row_M, y_ME)  # a token's pairs on this rank, summed here
        self._count(rows, plan.token_splits_in[self.rank])
        back = all_to_all(rows, plan.token_splits_out, plan.token_splits_in, self.group_name)
        out = torch.zeros(plan.n_tokens, y_ME.shape[-1], dtype=y_ME.dtype, device=y_ME.device)
        return out.index_add(0, plan.send_token_S, back)

    @property
    def bytes_sent(self) -> int:
        return int(self._bytes_sent)

    @bytes_sent.setter
    def bytes_sent(self, value: int) -> None:
        self._bytes_sent.fill_(value)

    def _count(self, sent: torch.Tensor, rows_to_self: int) -> None:
        """Add the bytes of ``sent`` that leave this rank (rows addressed to itself stay)."""
        row = math.prod(sent.shape[1:]) * sent.element_size()
        self._bytes_sent.add_((sent.shape[0] - rows_to_self) * row)
