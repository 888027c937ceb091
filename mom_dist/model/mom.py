"""The Mixture-of-Modules language model (spec §2-§6) as a plain ``nn.Module``.

    embeddings -> B bottom blocks -> C x [MoM chunk (H routing steps) (+ anchor block)]
               -> T top blocks -> final LayerNorm -> LM head tied to the token embedding

One routing step of a chunk reads: route -> dispatch -> compute on local modules -> combine,
once for attention (whose core runs on the token's own rank, between the QKV and output
projections, which share one plan) and once for the FFN. The chunk's ``dispatcher`` is a
swappable object: ``LocalDispatcher`` here, the all-to-all dispatcher under expert
parallelism (``mom_dist.parallel.expert_parallel.apply_expert_parallel``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mom_dist.model import losses
from mom_dist.model.cache import LayerCache, ModelCache
from mom_dist.model.config import ModelConfig
from mom_dist.model.dispatch import LocalDispatcher
from mom_dist.model.layers import Block, causal_attention, init_gpt2_
from mom_dist.model.modules import AttentionPool, FFNPool
from mom_dist.model.router import Router


@dataclass
class RoutingRecord:
    """What one router decided at one routing step (inputs to losses and telemetry)."""

    chunk: int
    step: int
    pool: str  # "attn" | "ffn"
    n_modules: int
    logits_TC: torch.Tensor
    probs_TC: torch.Tensor
    ids_TK: torch.Tensor
    dropped: torch.Tensor  # () pairs dropped by capacity


@dataclass
class MoMOutput:
    logits: torch.Tensor | None  # (B, S, V); None when called with hidden_only
    loss: torch.Tensor | None = None  # lm + balance_coef * balance + z_loss_coef * z
    lm_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    routing: list[RoutingRecord] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # (B, S, D) after the final LayerNorm (only with hidden_only)


class MoMChunk(nn.Module):
    """One MoM block: its module pools, its two routers, run for H routing steps."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index
        grouped = cfg.grouped_gemm != "off"
        self.attn_pool = AttentionPool(cfg.n_attn_modules, cfg.d_model, cfg.layer_norm_eps, grouped)
        self.ffn_pool = FFNPool(cfg.n_ffn_modules, cfg.d_model, cfg.layer_norm_eps, grouped)
        self.attn_router = Router(cfg.attn_router, cfg.d_model, cfg.n_classes, cfg.n_attn_modules, cfg.router_bias)
        self.ffn_router = Router(cfg.ffn_router, cfg.d_model, cfg.n_classes, cfg.n_ffn_modules, cfg.router_bias)
        self.dispatcher = LocalDispatcher()

    def forward(self, x_BSD, caches: list[LayerCache] | None = None, attn_mask_BSL=None):
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        state_a = self.attn_router.initial_state(x_TD)
        state_f = self.ffn_router.initial_state(x_TD)
        records = []
        for step in range(self.cfg.n_steps):
            cache = caches[step] if caches is not None else None
            x_TD, state_a, state_f, rec_a, rec_f = self.routing_step(
                x_TD, state_a, state_f, step, (B, S), cache, attn_mask_BSL)
            records += [rec_a, rec_f]
        return x_TD.view(B, S, D), records

    def _recompute(self, fn, *args, **kwargs):
        """Activation checkpointing inside a routing step: module compute and the attention core
        are recomputed in backward; routing, plans and all-to-alls are not (re-running them would
        repeat the communication and its host syncs)."""
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    def routing_step(self, x_TD, state_a, state_f, step, shape, cache, attn_mask_BSL):
        cfg, disp = self.cfg, self.dispatcher
        B, S = shape
        D = x_TD.shape[-1]
        drop = cfg.dropout if self.training else 0.0

        # Attention: route -> dispatch -> QKV_i -> combine (unweighted by default, spec §5.2)
        ra = self.attn_router(x_TD, state_a, step)
        plan = disp.plan(ra.ids_TK, cfg.n_attn_modules)
        xhat = F.layer_norm(x_TD, (D,), eps=cfg.layer_norm_eps)
        qkv_rows = self._recompute(self.attn_pool.qkv, disp.dispatch(plan, xhat), plan.groups)
        qkv_TE = disp.combine(plan, qkv_rows, ra.weights_TK if cfg.qkv_weighted else None)
        q, k, v = qkv_TE.view(B, S, 3 * D).split(D, dim=-1)
        # A token whose picks are all SKIP has q = k = v = 0 (reference: others still see it).
        keep = (ra.ids_TK < cfg.n_attn_modules).any(-1).view(B, S) if cfg.mask_skip_keys else None
        if cache is not None:
            k, v, keep = cache.append(k, v, keep)
        attn = self._recompute(causal_attention, q, k, v, cfg.n_heads, key_keep_BL=keep,
                               attn_mask_BSL=attn_mask_BSL, dropout_p=drop).reshape(B * S, D)
        # Output projection reuses the QKV plan: same tokens, same modules.
        o_rows = self._recompute(self.attn_pool.out, disp.dispatch(plan, attn), plan.groups)
        x_TD = x_TD + F.dropout(disp.combine(plan, o_rows, ra.weights_TK), drop, self.training).to(x_TD.dtype)

        # FFN: its own route and plan, on the updated residual stream.
        rf = self.ffn_router(x_TD, state_f, step)
        fplan = disp.plan(rf.ids_TK, cfg.n_ffn_modules)
        xhat = F.layer_norm(x_TD, (D,), eps=cfg.layer_norm_eps)
        f_rows = self._recompute(self.ffn_pool.ffn, disp.dispatch(fplan, xhat), fplan.groups)
        x_TD = x_TD + F.dropout(disp.combine(fplan, f_rows, rf.weights_TK), drop, self.training).to(x_TD.dtype)

        rec_a = RoutingRecord(self.index, step, "attn", cfg.n_attn_modules, ra.logits_TC, ra.probs_TC,
                              ra.ids_TK, plan.dropped)
        rec_f = RoutingRecord(self.index, step, "ffn", cfg.n_ffn_modules, rf.logits_TC, rf.probs_TC,
                              rf.ids_TK, fplan.dropped)
        return x_TD, ra.state_TR, rf.state_TR, rec_a, rec_f


class MoMModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D, eps, p = cfg.d_model, cfg.layer_norm_eps, cfg.dropout
        self.wte = nn.Embedding(cfg.vocab_size, D)
        self.wpe = nn.Embedding(cfg.max_seq_len, D)
        self.bottom = nn.ModuleList([Block(D, cfg.n_heads, eps, p) for _ in range(cfg.n_bottom)])
        self.chunks = nn.ModuleList([MoMChunk(cfg, c) for c in range(cfg.n_chunks)])
        self.anchors = nn.ModuleList([Block(D, cfg.n_heads, eps, p) for _ in range(cfg.n_chunks if cfg.anchor else 0)])
        self.top = nn.ModuleList([Block(D, cfg.n_heads, eps, p) for _ in range(cfg.n_top)])
        self.ln_f = nn.LayerNorm(D, eps=eps)
        init_gpt2_(self, cfg.init_std, cfg.depth)

    def forward(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor | None = None, *,
                loss_mask_BS: torch.Tensor | None = None, position_ids_BS: torch.Tensor | None = None,
                attention_mask_BSL: torch.Tensor | None = None, cache: ModelCache | None = None,
                hidden_only: bool = False) -> MoMOutput:
        """``hidden_only``: return the final hidden states instead of the vocabulary logits (task
        heads, e.g. sequence classification, skip the LM head)."""
        cfg = self.cfg
        B, S = input_ids_BS.shape
        past = len(cache) if cache is not None else 0
        if past + S > cfg.max_seq_len:
            raise ValueError(f"sequence of {past + S} tokens exceeds model.max_seq_len={cfg.max_seq_len}")
        if position_ids_BS is None:
            position_ids_BS = torch.arange(past, past + S, device=input_ids_BS.device).expand(B, S)
        x = self.wte(input_ids_BS) + self.wpe(position_ids_BS)
        x = F.dropout(x, cfg.dropout, self.training)
        routing: list[RoutingRecord] = []
        for i, block in enumerate(self.bottom):
            x = self._block(block, x, cache.bottom[i] if cache is not None else None, attention_mask_BSL)
        for c, chunk in enumerate(self.chunks):
            x, records = chunk(x, cache.chunks[c] if cache is not None else None, attention_mask_BSL)
            routing += records
            if cfg.anchor:
                x = self._block(self.anchors[c], x, cache.anchors[c] if cache is not None else None, attention_mask_BSL)
        for i, block in enumerate(self.top):
            x = self._block(block, x, cache.top[i] if cache is not None else None, attention_mask_BSL)
        if hidden_only:
            if labels_BS is not None:
                raise ValueError("hidden_only returns no logits, so it takes no labels")
            return MoMOutput(logits=None, routing=routing, hidden=self.ln_f(x))
        logits = F.linear(self.ln_f(x), self.wte.weight)
        out = MoMOutput(logits=logits, routing=routing)
        if labels_BS is not None:
            out.lm_loss = losses.lm_loss(logits, labels_BS, loss_mask_BS)
            out.balance_loss, out.z_loss = self.router_losses(routing)
            out.loss = out.lm_loss
            if cfg.balance_coef > 0:
                out.loss = out.loss + cfg.balance_coef * out.balance_loss
            if cfg.z_loss_coef > 0:
                out.loss = out.loss + cfg.z_loss_coef * out.z_loss
        return out

    def _block(self, block, x, cache, attn_mask):
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            return checkpoint(block, x, None, attn_mask, use_reentrant=False)
        return block(x, cache, attn_mask)

    def router_losses(self, routing: list[RoutingRecord]) -> tuple[torch.Tensor, torch.Tensor]:
        """Balance and z-loss. z: averaged over the routers (chunks x {attn, ffn}). Balance, by
        ``balance_reduction``: ``mean`` averages the routers' losses (each over its own chunk's
        steps); ``release`` sums the attention and FFN losses, each over all chunks' steps."""
        cfg = self.cfg

        def bal(recs):
            return losses.balance_loss([r.probs_TC for r in recs], [r.ids_TK[:, 0] for r in recs],
                                       depthwise=cfg.balance_mode == "depthwise",
                                       double_softmax=cfg.balance_double_softmax)

        per_router = [[r for r in routing if r.chunk == c and r.pool == pool]
                      for c in range(cfg.n_chunks) for pool in ("attn", "ffn")]
        z = torch.stack([losses.router_z_loss([r.logits_TC for r in recs]) for recs in per_router]).mean()
        if cfg.balance_reduction == "release":
            balance = sum(bal([r for r in routing if r.pool == pool]) for pool in ("attn", "ffn"))
        else:
            balance = torch.stack([bal(recs) for recs in per_router]).mean()
        return balance, z

    def num_parameters(self, *, modules_only: bool = False) -> int:
        if modules_only:
            return sum(p.numel() for c in self.chunks for pool in (c.attn_pool, c.ffn_pool) for p in pool.parameters())
        return sum(p.numel() for p in self.parameters())
