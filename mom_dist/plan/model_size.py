"""Parameter counts and training FLOPs of a MoM model, from its config alone (no weights built).

The counts follow the parameter shapes of ``mom_dist.model`` (GPT-2 blocks with biases, module
pools stacked (N, in, out), GRU or MLP routers) and are tested equal to ``MoMModel``'s own
``num_parameters`` for every preset in ``configs/``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mom_dist.model.config import ModelConfig, RouterConfig


def block_params(d: int) -> int:
    """One GPT-2 block: 2 LayerNorms, QKV (d, 3d), proj (d, d), fc (d, 4d), proj (4d, d), biases."""
    return 12 * d * d + 13 * d


def attn_module_params(d: int) -> int:
    """LN affine (2d) + QKV (d x 3d + 3d) + output (d x d + d)."""
    return 4 * d * d + 6 * d


def ffn_module_params(d: int) -> int:
    """LN affine (2d) + fc (d x 4d + 4d) + proj (4d x d + d)."""
    return 8 * d * d + 7 * d


def router_params(r: RouterConfig, d: int, n_classes: int, head_bias: bool = False) -> int:
    if r.kind == "gru":  # GRUCell(d, r): W_ih (3r, d), W_hh (3r, r), two 3r biases; head (C, r), bias if router_bias
        return 3 * r.dim * (d + r.dim) + 6 * r.dim + n_classes * r.dim + (n_classes if head_bias else 0)
    return d * r.dim + r.dim + r.dim * n_classes + n_classes  # Linear(d, r) + ReLU + Linear(r, C)


@dataclass
class ParamCounts:
    total: int
    module: int  # all module-pool parameters (expert-parallel: a rank holds module / EP)
    dense_blocks: int  # bottom + anchors + top GPT-2 blocks
    embeddings: int  # token + position (the LM head is tied to the token embedding)
    routers: int

    @property
    def non_module(self) -> int:
        return self.total - self.module


def param_counts(m: ModelConfig) -> ParamCounts:
    d = m.d_model
    n_blocks = m.n_bottom + m.n_top + (m.n_chunks if m.anchor else 0)
    pools = m.n_chunks * (m.n_attn_modules * attn_module_params(d) + m.n_ffn_modules * ffn_module_params(d))
    routers = m.n_chunks * (router_params(m.attn_router, d, m.n_classes, m.router_bias)
                            + router_params(m.ffn_router, d, m.n_classes, m.router_bias))
    emb = (m.vocab_size + m.max_seq_len) * d
    dense = n_blocks * block_params(d)
    total = emb + dense + pools + routers + 2 * d  # + final LayerNorm
    return ParamCounts(total, pools, dense, emb, routers)


def active_share(router: RouterConfig, skip_rate: float) -> float:
    """Module computations per token and routing step: K picks, of which a share are SKIP."""
    return router.top_k * (1.0 - skip_rate)


@dataclass
class StepFlops:
    """Training FLOPs per token (forward + backward = 3 x forward; recompute adds 1 x forward)."""

    dense: float  # embeddings-free GPT-2 blocks + LM head + attention cores of dense blocks
    modules: float  # routed module matmuls (expert-parallel; subject to EP load imbalance)
    attention_core: float  # causal softmax(QK^T)V of the routing steps (on the token's own rank)
    routers: float

    @property
    def total(self) -> float:
        return self.dense + self.modules + self.attention_core + self.routers


def flops_per_token(m: ModelConfig, seq_len: int, skip_attn: float = 0.0, skip_ffn: float = 0.0,
                    recompute: bool = False) -> StepFlops:
    """6 x (matmul weights a token meets) + 6 x S x d per causal attention core (2 x 2 S d
    forward, halved by causality, times 3 for backward); with activation checkpointing the
    forward runs twice (8 instead of 6). ``skip_*`` is the share of picks that are SKIP."""
    d, f = m.d_model, (8 if recompute else 6)
    n_blocks = m.n_bottom + m.n_top + (m.n_chunks if m.anchor else 0)
    dense = f * (n_blocks * 12 * d * d + m.vocab_size * d) + f * n_blocks * seq_len * d
    steps = m.n_chunks * m.n_steps
    modules = f * steps * (active_share(m.attn_router, skip_attn) * 4 * d * d
                           + active_share(m.ffn_router, skip_ffn) * 8 * d * d)
    core = f * steps * seq_len * d
    routers = 0.0
    for r in (m.attn_router, m.ffn_router):
        per = 3 * r.dim * (d + r.dim) + r.dim * m.n_classes if r.kind == "gru" else r.dim * (d + m.n_classes)
        routers += f * steps * per
    return StepFlops(float(dense), float(modules), float(core), float(routers))
