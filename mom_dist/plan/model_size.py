"""Parameter counts and matmul FLOPs of a MoM model, from its config alone (no weights built).

The counts follow the parameter shapes of ``mom_dist.model`` (GPT-2 blocks with biases, module
pools stacked (N, in, out), GRU or MLP routers) and are tested equal to ``MoMModel``'s own
``num_parameters`` for every preset in ``configs/``.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

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


# ------------------------------------------------------------------------------ FLOPs
# What is counted: every matrix multiplication the model runs, as torch.utils.flop_counter's
# FlopCounterMode counts it (2 x m x k x n per matmul), and nothing else (LayerNorm, GELU,
# softmax, residual adds, dispatch gathers/scatters and the losses are not matmuls):
# - dense: QKV, output, fc and proj of the bottom, anchor and top GPT-2 blocks (24 d^2 per token);
# - modules: the same projections of each routed pick (QKV + output 8 d^2, FFN 16 d^2 per row);
# - gathers: the one-hot matmuls that fetch each row's module LayerNorm affine and biases
#   (``Groups.onehot @ stacked``: 12 N_A d and 14 N_F d per row) - an implementation cost;
# - attention_core: QK^T and AV of every attention, every query against every key as
#   FlopCounterMode counts scaled_dot_product_attention (4 S d per token; a causal kernel skips
#   about half of it: ``causal=True`` counts S/2 keys per query);
# - routers: GRU cell (3 r (d + r)) or MLP (r (d + C)) and the head (r C) per token and step;
# - lm_head: the tied LM head (d V per token).
# Backward: 2 x forward for a matmul whose input needs a gradient, 1 x when only the weight does
# (the one-hot gathers; a GRU router's first step, whose state starts at zero), 0 for a router
# that gets no gradient (renormalised K=1 weights are exactly 1 and, without a balance or z-loss
# term, nothing else reaches it); the attention core 2.5 x (flash backward recomputes the scores:
# 5 matmuls for 2). Activation checkpointing recomputes, in backward, the blocks, the module
# compute and the attention cores (not the routers, not the LM head: ``MoMChunk._recompute``),
# and stops each recomputation once the last tensor the backward needs is back (torch's early
# stop): a region's last matmul, which saves only its input, is not run again - a block's FFN
# output projection (8 d^2) and a module's last bias gather.


@dataclass
class Flops:
    """Matmul FLOPs per token of one pass (or a sum of passes), by part (see above)."""

    dense: float = 0.0
    modules: float = 0.0
    gathers: float = 0.0
    attention_core: float = 0.0
    routers: float = 0.0
    lm_head: float = 0.0

    @property
    def total(self) -> float:
        return self.dense + self.modules + self.gathers + self.attention_core + self.routers + self.lm_head

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(*(a + b for a, b in zip(astuple(self), astuple(other))))


def rows_per_token(router: RouterConfig, skip_rate: float, skip_rows_computed: bool) -> float:
    """Rows a pool computes per token and routing step. Dropless expert-parallel dispatch sends
    only module picks (K x (1 - SKIP share)); the single-process ``LocalDispatcher`` (ep_size 1)
    computes SKIP picks too, as padding rows that ``combine`` masks out (K rows)."""
    return float(router.top_k) if skip_rows_computed else active_share(router, skip_rate)


def _router_flops(r: RouterConfig, d: int, n_classes: int) -> tuple[float, float]:
    """(forward FLOPs per token and step, the part that multiplies the recurrent state)."""
    if r.kind == "gru":
        return 2.0 * (3 * r.dim * d + 3 * r.dim * r.dim + r.dim * n_classes), 6.0 * r.dim * r.dim
    return 2.0 * (d * r.dim + r.dim * n_classes), 0.0


def pass_flops(m: ModelConfig, seq_len: int, phase: str, *, skip_attn: float = 0.0, skip_ffn: float = 0.0,
               skip_rows_computed: bool = False, causal: bool = False) -> Flops:
    """Matmul FLOPs per token of one ``phase``: "forward", "backward" or "recompute" (the
    forward work activation checkpointing repeats in backward)."""
    d, steps = m.d_model, m.n_chunks * m.n_steps
    n_blocks = m.n_bottom + m.n_top + (m.n_chunks if m.anchor else 0)
    ra = rows_per_token(m.attn_router, skip_attn, skip_rows_computed)
    rf = rows_per_token(m.ffn_router, skip_ffn, skip_rows_computed)
    keys = seq_len / 2 if causal else seq_len
    fwd = Flops(dense=n_blocks * 24.0 * d * d,
                modules=steps * (ra * 8.0 + rf * 16.0) * d * d,
                gathers=steps * (ra * 12.0 * m.n_attn_modules + rf * 14.0 * m.n_ffn_modules) * d,
                attention_core=(n_blocks + steps) * 4.0 * keys * d,
                lm_head=2.0 * d * m.vocab_size)
    routers_fwd = routers_bwd = 0.0
    for r in (m.attn_router, m.ffn_router):
        total, state = _router_flops(r, d, m.n_classes)
        routers_fwd += steps * total
        if router_gets_gradient(m, r):
            routers_bwd += 2 * steps * total - m.n_chunks * state  # step 0: no gradient for the zero state
    if phase == "forward":
        fwd.routers = routers_fwd
        return fwd
    if phase == "backward":
        return Flops(dense=2 * fwd.dense, modules=2 * fwd.modules, gathers=fwd.gathers,
                     attention_core=2.5 * fwd.attention_core, lm_head=2 * fwd.lm_head, routers=routers_bwd)
    if phase == "recompute":
        return Flops(dense=n_blocks * 16.0 * d * d, modules=fwd.modules,
                     gathers=steps * (ra * 4.0 * m.n_attn_modules + rf * 12.0 * m.n_ffn_modules) * d,
                     attention_core=fwd.attention_core)
    raise ValueError(f"phase={phase!r}: use forward, backward or recompute")


def weights_need_grad(r: RouterConfig) -> bool:
    """Whether a router's pick weights carry a gradient (renormalised K=1 weights are exactly 1)."""
    return not (r.weighting == "renorm" and r.top_k == 1)


def router_gets_gradient(m: ModelConfig, r: RouterConfig) -> bool:
    return weights_need_grad(r) or m.balance_coef > 0 or m.z_loss_coef > 0


def training_flops(m: ModelConfig, seq_len: int, *, checkpointing: bool | None = None, **kw) -> Flops:
    """Forward + backward (+ the recomputed forward under activation checkpointing) per token."""
    ac = m.activation_checkpointing if checkpointing is None else checkpointing
    total = pass_flops(m, seq_len, "forward", **kw) + pass_flops(m, seq_len, "backward", **kw)
    return total + pass_flops(m, seq_len, "recompute", **kw) if ac else total


def flops_per_token(m: ModelConfig, seq_len: int, skip_attn: float = 0.0, skip_ffn: float = 0.0,
                    recompute: bool = False) -> Flops:
    """Training FLOPs per token as ``mom-plan`` times them: causal attention cores (the work a
    flash kernel does), SKIP picks free (dropless expert-parallel dispatch)."""
    return training_flops(m, seq_len, checkpointing=recompute, skip_attn=skip_attn, skip_ffn=skip_ffn, causal=True)
