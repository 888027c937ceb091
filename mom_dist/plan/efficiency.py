"""Efficiency of one model at a given batch and sequence length: parameters, computation depth,
forward and training FLOPs, forward activation memory and single-GPU training memory.

    from mom_dist.plan.efficiency import efficiency
    e = efficiency(cfg.model, batch=8, seq_len=1024)            # -> Efficiency
    e.forward_flops.total, e.bf16.forward_activations, e.fp32.training

The figures the paper's efficiency claims are about (arXiv 2407.06677: depth, forward TFLOPs,
forward memory), computed from the config alone with the planner's own counting
(``model_size``: parameters and matmul FLOPs; ``memory``: activations, parameter and optimizer
state). ``mom-plan --compare`` prints them as a table. FLOPs and forward activation bytes are
checked against ``FlopCounterMode`` and the CPU allocator within 2%
(``tests/plan/test_efficiency.py``); see ``model_size`` for what the FLOPs count.

SKIP: ``skip_attn`` / ``skip_ffn`` are the shares of picks that are SKIP (from a run's routing
telemetry, ``RoutingProfile``, or 0). By default a SKIP pick costs nothing, as in the model and in
dropless expert-parallel runs; ``skip_rows_computed=True`` gives what an ep_size 1 run does (its
local dispatcher computes SKIP picks as padding rows, so FLOPs and memory are those of no SKIP).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mom_dist.model.config import ModelConfig
from mom_dist.plan.memory import (Activations, forward_activation_bytes, gradient_bytes, logits_bytes,
                                  param_state_bytes, width)
from mom_dist.plan.model_size import Flops, active_share, param_counts, pass_flops, training_flops
from mom_dist.plan.traffic import RoutingProfile


@dataclass
class PrecisionMemory:
    """Memory of one training step on one GPU (ep_size 1, ZeRO 0, DeepSpeed's layout) in one
    precision: bf16 keeps bf16 weights and gradients plus fp32 master weights and gradients."""

    precision: str
    forward_activations: float  # bytes one training forward of batch x seq keeps for backward
    activations: Activations  # the same by part
    weights: float
    grads: float
    optimizer: float  # fp32 master copy (bf16) + AdamW exp_avg and exp_avg_sq
    backward_extra: float  # fp32 log-softmax gradient temporaries at the start of backward
    kv_cache: float  # generation: keys and values of batch x seq tokens (one cache per attention run)

    @property
    def training(self) -> float:
        return self.weights + self.grads + self.optimizer + self.forward_activations + self.backward_extra


@dataclass
class Efficiency:
    name: str
    batch: int
    seq_len: int
    checkpointing: bool
    skip_attn: float  # share of attention picks that are SKIP (as measured, or 0)
    skip_ffn: float
    skip_source: str
    skip_rows_computed: bool
    params_total: int
    params_activated: float  # weights a token's forward multiplies with (a module once per pass)
    depth: int  # layers on a token's path: B + C x (H + anchor) + T (spec §2)
    modules_per_token: float  # attention + FFN modules a token is computed by (SKIP as measured)
    forward_flops: Flops  # per token
    training_flops: Flops  # per token: forward + backward (+ recompute with checkpointing)
    bf16: PrecisionMemory
    fp32: PrecisionMemory
    # With SKIP picks that cost nothing: what an ep_size 1 run does instead (its local dispatcher
    # computes SKIP picks as padding rows): forward FLOPs per token, bf16 forward activation bytes.
    ep1_forward_flops: float | None = None
    ep1_forward_activations_bf16: float | None = None

    def precision(self, name: str) -> PrecisionMemory:
        return {"bf16": self.bf16, "fp32": self.fp32}[name]

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def to_dict(self) -> dict:
        out = asdict(self)
        out["forward_flops"]["total"] = self.forward_flops.total
        out["training_flops"]["total"] = self.training_flops.total
        for p in ("bf16", "fp32"):
            out[p]["training"] = self.precision(p).training
            out[p]["activations"]["total"] = self.precision(p).activations.total
        return out


def memory(m: ModelConfig, batch: int, seq_len: int, precision: str, checkpointing: bool, skip_attn: float,
           skip_ffn: float, skip_rows_computed: bool) -> PrecisionMemory:
    counts = param_counts(m)
    state = param_state_bytes(counts, ep=1, zero=0, world=1, precision=precision)
    acts = forward_activation_bytes(m, batch, seq_len, precision, checkpointing, skip_attn, skip_ffn,
                                    skip_rows_computed)
    return PrecisionMemory(precision, acts.total, acts, state["params"],
                           gradient_bytes(counts, ep=1, zero=0, world=1, precision=precision),
                           state["master"] + state["states"], logits_bytes(m, batch, seq_len),
                           kv_cache_bytes(m, batch, seq_len, precision))


def kv_cache_bytes(m: ModelConfig, batch: int, seq_len: int, precision: str) -> float:
    """Keys and values ``generate`` caches for batch x seq tokens: every dense block and every
    routing step runs its own attention (``mom_dist.model.cache``), 2 d per token each."""
    n_attn = m.n_bottom + m.n_top + (m.n_chunks if m.anchor else 0) + m.n_chunks * m.n_steps
    return float(n_attn * 2 * m.d_model * batch * seq_len * width(precision))


def efficiency(m: ModelConfig, batch: int, seq_len: int, *, name: str = "", checkpointing: bool | None = None,
               profile: RoutingProfile | None = None, skip_attn: float = 0.0, skip_ffn: float = 0.0,
               skip_rows_computed: bool = False) -> Efficiency:
    """Every figure of the efficiency table for one model (``profile`` overrides ``skip_*``)."""
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch={batch} and seq_len={seq_len} must be >= 1")
    if seq_len > m.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds model.max_seq_len={m.max_seq_len} (learned positions)")
    source = "none"
    if profile is not None:
        skip_attn, skip_ffn, source = profile.skip_rate("attn"), profile.skip_rate("ffn"), profile.source
    ac = m.activation_checkpointing if checkpointing is None else checkpointing
    kw = dict(skip_attn=skip_attn, skip_ffn=skip_ffn, skip_rows_computed=skip_rows_computed)
    fwd = pass_flops(m, seq_len, "forward", **kw)
    n_blocks = m.n_bottom + m.n_top + (m.n_chunks if m.anchor else 0)
    per_step = active_share(m.attn_router, skip_attn) + active_share(m.ffn_router, skip_ffn)
    ep1 = None
    if (skip_attn or skip_ffn) and not skip_rows_computed:
        ep1 = efficiency(m, batch, seq_len, checkpointing=ac, skip_attn=skip_attn, skip_ffn=skip_ffn,
                         skip_rows_computed=True)
    return Efficiency(
        name=name, batch=batch, seq_len=seq_len, checkpointing=ac, skip_attn=skip_attn, skip_ffn=skip_ffn,
        skip_source=source, skip_rows_computed=skip_rows_computed,
        params_total=param_counts(m).total,
        params_activated=(fwd.dense + fwd.modules + fwd.routers + fwd.lm_head) / 2,
        depth=m.depth, modules_per_token=2 * n_blocks + m.n_chunks * m.n_steps * per_step,
        forward_flops=fwd, training_flops=training_flops(m, seq_len, checkpointing=ac, **kw),
        bf16=memory(m, batch, seq_len, "bf16", ac, **kw), fp32=memory(m, batch, seq_len, "fp32", ac, **kw),
        ep1_forward_flops=ep1.forward_flops.total if ep1 else None,
        ep1_forward_activations_bf16=ep1.bf16.forward_activations if ep1 else None)
