"""Expert parallelism applied to a plain ``MoMModel`` from outside.

``apply_expert_parallel(model, dims)`` keeps, on each rank, its slice of every chunk's module
pools (N_A/EP attention and N_F/EP FFN modules) and swaps each chunk's local dispatcher for the
all-to-all one. Build the full model with the same seed on every rank first: the slices then
hold exactly the weights a single process would, so the numbers do not depend on the layout.
"""

from __future__ import annotations

from mom_dist.model.mom import MoMModel
from mom_dist.parallel.all_to_all import AllToAllDispatcher
from mom_dist.parallel.dims import ParallelDims
from mom_dist.model.dispatch import LocalDispatcher


def apply_expert_parallel(model: MoMModel, dims: ParallelDims, capacity_factor: float | None = None) -> MoMModel:
    cfg = model.cfg
    for name, n in (("n_attn_modules", cfg.n_attn_modules), ("n_ffn_modules", cfg.n_ffn_modules)):
        if n % dims.ep_size:
            raise ValueError(f"parallel.ep_size={dims.ep_size} must divide model.{name}={n}")
    for chunk in model.chunks:
        if dims.ep_size == 1:
            chunk.dispatcher = LocalDispatcher(capacity_factor)
            continue
        for pool in (chunk.attn_pool, chunk.ffn_pool):
            n_local = pool.n_global // dims.ep_size
            pool.keep_slice(dims.ep_rank * n_local, n_local)
        chunk.dispatcher = AllToAllDispatcher(dims.ep_group, dims.ep_size, dims.ep_rank, capacity_factor)
    return model


def module_parameters(model: MoMModel):
    """(name, parameter) of every pool module (expert-parallel, reduced over the EDP group)."""
    for name, p in model.named_parameters():
        if ".attn_pool." in name or ".ffn_pool." in name:
            yield name, p
