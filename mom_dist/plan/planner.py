"""Enumerate the training layouts a cluster can run, and predict each one's memory and time.

A layout is (EP, ZeRO stage, micro-batch, activation checkpointing) on the whole cluster
(world = nodes x GPUs per node; every rank is data-parallel for non-module parameters, EDP =
world / EP ranks hold each module slice). Validity is the trainer's own: the config is
re-validated with the layout applied (``Config.validate``: EP divides both pools, ZeRO-3
refused) and ``check_world`` / ``accumulation_steps`` (EP divides the world, the global batch
splits into micro-batches). Times are estimates from the cluster's peak FLOP/s and bandwidths
under the stated ``Assumptions``; nothing is overlapped (``overlap_comm`` is off in our
DeepSpeed config and all-to-alls block the forward).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

from mom_dist.config import Config, accumulation_steps, check_world
from mom_dist.plan.cluster import ClusterConfig
from mom_dist.plan.memory import Memory, layout_memory
from mom_dist.plan.model_size import ParamCounts, flops_per_token, param_counts
from mom_dist.plan.traffic import A2A_CALLS_PER_STEP, RoutingProfile, a2a_bytes_per_microbatch


@dataclass
class Assumptions:
    mfu: float = 0.35  # achieved share of peak FLOP/s (bf16 peak; fp32 runs as TF32 at half of it)
    usable_memory: float = 0.90  # share of GPU memory the allocator can use (fragmentation, caches)
    reserve_gb: float = 2.0  # CUDA context, NCCL buffers, workspace
    a2a_latency_us: float = 20.0  # fixed cost of one all_to_all call
    bw_efficiency: float = 0.7  # share of the link bandwidth collectives achieve

    def lines(self, cluster: ClusterConfig, profile: RoutingProfile) -> list[str]:
        return [
            f"compute: {self.mfu:.0%} of peak {cluster.peak_bf16_tflops:g} TFLOP/s per GPU (bf16; fp32 as TF32 at half "
            "of it); FLOPs = every matmul of forward + backward (K picks x non-SKIP share per routing step, routers, "
            "tied LM head, causal attention cores at S/2 keys per query), + the recomputed forward with activation "
            "checkpointing (mom_dist.plan.model_size)",
            f"routing: {profile.source}; the busiest EP rank's module compute and received bytes scale with its "
            "share of the picks (EP load imbalance)",
            f"links: {self.bw_efficiency:.0%} of {cluster.intra_node_gbps:g} Gbit/s inside a node and "
            f"{cluster.inter_node_gbps:g} Gbit/s per GPU across nodes; {self.a2a_latency_us:g} us per all_to_all "
            "call; EP groups are consecutive ranks (DeepSpeed): the rank with the most EP peers on other nodes sets "
            "the pace",
            "gradients: ring all-reduce volume 2 (n-1)/n per parameter byte (ZeRO 1/2's reduce-scatter + all-gather "
            "move the same); non-module over the world, module over EDP = world / EP; once per optimizer step",
            "nothing overlaps: step time = compute + all-to-all + gradient communication",
            f"memory fits if total <= {self.usable_memory:.0%} x {cluster.gpu_memory_gb:g} GiB - {self.reserve_gb:g} GiB; "
            "activations: what autograd keeps for one micro-batch + the logits and their fp32 gradient; "
            "allocator fragmentation comes on top",
            "recommended: the fastest layout that fits; among those within 1% of it, micro-batches of at least "
            f"{EFFICIENT_TOKENS:,} tokens (launch overheads are not modelled), then the least memory",
        ]


@dataclass
class Layout:
    ep: int
    edp: int
    zero: int
    micro_batch: int
    accumulation: int
    checkpointing: bool
    memory: Memory
    a2a_bytes_step: float  # bytes one rank sends per optimizer step (fwd + bwd payload + control)
    grad_bytes_step: float
    compute_s: float
    a2a_s: float
    grad_s: float
    fits: bool
    notes: list[str] = field(default_factory=list)

    @property
    def step_s(self) -> float:
        return self.compute_s + self.a2a_s + self.grad_s


@dataclass
class Plan:
    cluster: ClusterConfig
    counts: ParamCounts
    profile: RoutingProfile
    assumptions: Assumptions
    layouts: list[Layout]
    rejected: dict  # reason -> the trainer's message for one such layout
    global_batch: int
    seq_len: int
    precision: str

    @property
    def recommended(self) -> Layout | None:
        fitting = [lay for lay in self.layouts if lay.fits]
        if not fitting:
            return None
        best = min(lay.step_s for lay in fitting)
        near = [lay for lay in fitting if lay.step_s <= best * 1.01]
        # The time model has no per-launch overheads, so it cannot tell micro-batches apart: prefer
        # ones of at least EFFICIENT_TOKENS tokens (GPU matmuls are efficient from there), then memory.
        return min(near, key=lambda lay: (max(0, EFFICIENT_TOKENS - lay.micro_batch * self.seq_len), lay.memory.total))

    def tokens_per_s(self, lay: Layout) -> float:
        return self.global_batch * self.seq_len / lay.step_s


EFFICIENT_TOKENS = 8192  # tokens per micro-batch from which a GPU step is assumed efficient

REFUSALS = {"config": "EP does not divide the module pools", "world": "EP does not divide the world",
            "batch": "global batch not a multiple of micro-batch x world"}


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _micro_batches(cfg: Config, world: int) -> list[int]:
    per_rank = cfg.train.global_batch_size // world if cfg.train.global_batch_size % world == 0 else 0
    out = {mb for mb in [2 ** i for i in range(12)] + [cfg.train.micro_batch_size] if 1 <= mb <= per_rank}
    return sorted(out)


@functools.lru_cache(maxsize=None)
def ep_inter_node_share(ep: int, world: int, gpus_per_node: int) -> float:
    """Largest share of a rank's EP peers on other nodes, over all ranks (the slowest rank sets
    the pace). EP groups are consecutive ranks (DeepSpeed), so a group crosses a node boundary
    when EP > GPUs per node or GPUs per node is not a multiple of EP."""
    worst = 0.0
    for rank in range(world):
        first = rank - rank % ep
        other = sum(1 for peer in range(first, first + ep) if peer // gpus_per_node != rank // gpus_per_node)
        worst = max(worst, other / (ep - 1))
    return worst


def _link_time(nbytes: float, spans_nodes: bool, inter_share: float, cluster: ClusterConfig, a: Assumptions) -> float:
    intra = cluster.intra_node_gbps * 1e9 / 8 * a.bw_efficiency
    inter = cluster.inter_node_gbps * 1e9 / 8 * a.bw_efficiency
    if not spans_nodes:
        return nbytes / intra
    return max(nbytes * (1 - inter_share) / intra, nbytes * inter_share / inter)


def plan_layouts(cfg: Config, cluster: ClusterConfig, profile: RoutingProfile | None = None,
                 assumptions: Assumptions | None = None) -> Plan:
    a = assumptions or Assumptions()
    m, t = cfg.model, cfg.train
    profile = profile or RoutingProfile.uniform(m)
    counts = param_counts(m)
    world = cluster.world
    usable = a.usable_memory * cluster.memory_bytes - a.reserve_gb * 2 ** 30
    peak = cluster.peak_bf16_tflops * 1e12 * (1.0 if t.precision == "bf16" else 0.5)  # fp32 via TF32 at half rate
    skip_a, skip_f = profile.skip_rate("attn"), profile.skip_rate("ffn")
    width = 2 if t.precision == "bf16" else 4
    layouts, rejected = [], {}
    for ep in _divisors(world):
        for zero in (0, 1, 2, 3):
            for mb in _micro_batches(cfg, world) or [t.micro_batch_size]:
                for ac in (False, True):
                    trial = copy.deepcopy(cfg)
                    trial.parallel.ep_size, trial.parallel.zero_stage = ep, zero
                    trial.train.micro_batch_size, trial.model.activation_checkpointing = mb, ac
                    stage = "config"  # which of the trainer's checks refused it
                    try:
                        trial.validate()
                        stage = "world"
                        check_world(ep, world)
                        stage = "batch"
                        ga = accumulation_steps(trial.train, world)
                    except ValueError as err:
                        reason = "ZeRO-3" if zero == 3 else REFUSALS[stage]
                        rejected.setdefault(reason, str(err))
                        continue
                    layouts.append(_estimate(trial, cluster, a, counts, profile, ep, zero, mb, ga, ac,
                                             usable, peak, skip_a, skip_f, width))
    layouts.sort(key=lambda lay: (not lay.fits, lay.step_s, lay.memory.total))
    return Plan(cluster, counts, profile, a, layouts, rejected, t.global_batch_size, t.seq_len, t.precision)


def _estimate(cfg, cluster, a, counts, profile, ep, zero, mb, ga, ac, usable, peak, skip_a, skip_f, width) -> Layout:
    m, t = cfg.model, cfg.train
    world, gpn = cluster.world, cluster.gpus_per_node
    mem = layout_memory(counts, m, ep=ep, zero=zero, world=world, precision=t.precision, micro_batch=mb,
                        seq_len=t.seq_len, checkpointing=ac, skip_attn=skip_a, skip_ffn=skip_f)
    tokens_mb = mb * t.seq_len
    imb = profile.imbalance(ep) if ep > 1 else 1.0
    # compute: every rank runs its micro-batches; module compute waits for the busiest EP rank
    fl = flops_per_token(m, t.seq_len, skip_a, skip_f, recompute=ac)
    tokens_rank = tokens_mb * ga
    routed = fl.modules + fl.gathers  # runs on the module's EP rank: waits for the busiest one
    compute_s = tokens_rank * (fl.total - routed + routed * imb) / (peak * a.mfu)
    # all-to-all: forward payload + control, backward payload again, per micro-batch
    per_mb = a2a_bytes_per_microbatch(m, profile, tokens=tokens_mb, ep=ep, precision=t.precision,
                                      dispatcher=cfg.parallel.dispatcher, capacity_factor=cfg.parallel.capacity_factor)
    a2a_step = ga * (2 * per_mb.payload + per_mb.control)
    a2a_s = 0.0
    if ep > 1:
        inter_share = ep_inter_node_share(ep, world, gpn)
        spans = inter_share > 0
        calls = ga * m.n_chunks * m.n_steps * sum(A2A_CALLS_PER_STEP.values())
        a2a_s = _link_time(a2a_step * imb, spans, inter_share, cluster, a) + calls * a.a2a_latency_us * 1e-6
    # gradients: non-module over the world, module slices over EDP, once per step
    edp = world // ep
    grad_bytes = 0.0
    grad_s = 0.0
    for n_params, group in ((counts.non_module, world), (counts.module / ep, edp)):
        if group > 1:
            b = 2 * (group - 1) / group * n_params * width
            grad_bytes += b
            spans = cluster.nodes > 1  # world and EDP groups (strided ranks) both reach every node
            grad_s += _link_time(b, spans, 1.0 if spans else 0.0, cluster, a)
    notes = []
    if imb > 1.01:
        notes.append(f"busiest EP rank x{imb:.2f}")
    return Layout(ep, edp, zero, mb, ga, ac, mem, a2a_step, grad_bytes, compute_s, a2a_s, grad_s,
                  mem.total <= usable, notes)
