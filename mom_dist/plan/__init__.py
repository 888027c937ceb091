"""``mom-plan``: predict per-GPU memory, all-to-all traffic and step time of every training
layout a cluster can run, from a model config (and optionally a run's measured routing); and
(``efficiency``, ``mom-plan --compare``) compare models' parameters, depth, FLOPs and memory.

Computes from configs and telemetry only: it never imports DeepSpeed or the trainer.
"""

from mom_dist.plan.cluster import ClusterConfig, load_cluster
from mom_dist.plan.efficiency import Efficiency, efficiency
from mom_dist.plan.planner import Assumptions, Layout, Plan, plan_layouts
from mom_dist.plan.traffic import RoutingProfile, read_routing

__all__ = ["Assumptions", "ClusterConfig", "Efficiency", "Layout", "Plan", "RoutingProfile", "efficiency",
           "load_cluster", "plan_layouts", "read_routing"]
