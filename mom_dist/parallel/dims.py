"""Process groups of a run, built once and passed around explicitly (no module-level globals
of our own).

World = ep_size x expert-data-parallel. Non-module parameters are data-parallel over the whole
world; each rank of an expert-parallel (EP) group holds 1/ep_size of every module pool, and
ranks holding the same modules form an expert-data-parallel (EDP) group. The groups come from
DeepSpeed's expert/data-parallel machinery (``deepspeed.utils.groups``), so the engine reduces
module gradients over the EDP group and the rest over the world. DeepSpeed's layout: EP groups
are consecutive ranks ([0,1], [2,3], ... for ep_size 2); EDP groups are strided.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from mom_dist.config import check_world


@dataclass
class ParallelDims:
    world_size: int
    rank: int
    ep_size: int
    ep_group: object | None  # None in a single process
    edp_group: object | None
    dp_group: object | None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_size(self) -> int:  # every rank consumes its own micro-batches
        return self.world_size

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def group_name(self) -> str:
        return f"ep_size_{self.ep_size}"  # DeepSpeed's name for these groups


def build_parallel_dims(ep_size: int) -> ParallelDims:
    """Create (or reuse) DeepSpeed's expert and data parallel groups for ``ep_size``.

    Needs an initialised process group (``deepspeed.init_distributed``)."""
    from deepspeed.utils import groups

    world = dist.get_world_size()
    check_world(ep_size, world)
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return ParallelDims(world, dist.get_rank(), ep_size, groups._get_expert_parallel_group(name),
                        groups._get_expert_data_parallel_group(name), groups._get_data_parallel_group())
