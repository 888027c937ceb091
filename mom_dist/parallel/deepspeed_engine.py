"""Everything DeepSpeed-specific, in one place.

- Module pools are presented to DeepSpeed as native MoE layers (``PoolAsDeepSpeedMoE``), so the
  engine (a) reduces module gradients over the expert-data-parallel group and the rest over the
  world, (b) keeps module parameters in their own ZeRO partitions. (Checkpoints do not use
  DeepSpeed's format, which ties optimizer shards to the layout:
  ``mom_dist.checkpoint.engine_state`` reads and restores the engine's state in any layout.)
- ``build_ds_config`` generates the DeepSpeed config from ours and merges a user JSON over it,
  rejecting settings that contradict ours before any collective starts.
- ``initialize`` builds the optimizer param groups (weight decay split, module groups split per
  DeepSpeed's MoE convention), the warmup+cosine schedule, and the engine.
- Gradient clipping by the true global norm over module and non-module parameters. DeepSpeed's
  ZeRO 1/2 optimizers get it right (module groups' partition norms are summed over all ranks);
  its ZeRO-0 fp32 path clips by an *average* of per-rank norms, which depends on the layout, so
  there we substitute ``GlobalNormClipper``.
"""

from __future__ import annotations

import copy
import json
import math
import re

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from mom_dist.config import Config, accumulation_steps
from mom_dist.model.modules import ModulePool
from mom_dist.parallel.dims import ParallelDims

# Where DeepSpeed finds a wrapped pool's tensors (``PoolAsDeepSpeedMoE``); group 1 is the EP rank
# whose slice they are.
EXPERT_KEY = re.compile(r"\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.")


class PoolAsDeepSpeedMoE(MoE):
    """A module pool seen by DeepSpeed as a native MoE layer.

    DeepSpeed finds "experts" at ``deepspeed_moe.experts.deepspeed_experts.{i}``. Our pools stack
    their modules, so each EP rank's whole slice is one such expert (``num_local_experts = 1``,
    ``num_experts = ep_size``); DeepSpeed's own checkpoint format (written by earlier mom_dist
    versions, still read by ``mom_dist.checkpoint``) has one ``layer_{L}_expert_{ep_rank}_...``
    file per pool and EP rank. Computation is delegated to the wrapped pool.
    """

    def __init__(self, pool: ModulePool, dims: ParallelDims):
        nn.Module.__init__(self)  # skip MoE.__init__: it would build its own experts and gate
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.experts = nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList([pool])
        object.__setattr__(self, "pool", pool)
        self.num_experts = dims.ep_size
        self.num_local_experts = 1
        self.ep_size = dims.ep_size
        self.expert_group_name = dims.group_name
        for p in pool.parameters():
            p.allreduce = False  # DeepSpeed's marks for expert parameters
            p.group_name = dims.group_name

    def set_deepspeed_parallelism(self, *args, **kwargs):
        """The engine calls this to create groups; ours come from ParallelDims already."""

    # the pool interface used by MoMChunk.routing_step
    def qkv(self, *args):
        return self.pool.qkv(*args)

    def out(self, *args):
        return self.pool.out(*args)

    def ffn(self, *args):
        return self.pool.ffn(*args)

    @property
    def first(self):
        return self.pool.first

    @property
    def n_global(self):
        return self.pool.n_global

    def forward(self, *args, **kwargs):
        raise RuntimeError("a module pool is called through qkv/out/ffn by its chunk")


def wrap_pools_for_deepspeed(model, dims: ParallelDims) -> None:
    for chunk in model.chunks:
        chunk.attn_pool = PoolAsDeepSpeedMoE(chunk.attn_pool, dims)
        chunk.ffn_pool = PoolAsDeepSpeedMoE(chunk.ffn_pool, dims)


def plain_state_key(key: str) -> str:
    """Map a DeepSpeed-wrapped state-dict key back to the plain model's key."""
    return EXPERT_KEY.sub(".", key)


# ----------------------------------------------------------------------------- config
def gradient_accumulation(cfg: Config, dims: ParallelDims) -> int:
    return accumulation_steps(cfg.train, dims.dp_size)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(cfg: Config, dims: ParallelDims, user: dict | None = None) -> dict:
    """DeepSpeed config from ours; a user's JSON (``parallel.ds_config``) is merged over it."""
    t, p = cfg.train, cfg.parallel
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation(cfg, dims),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": p.zero_stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if t.optimizer == "deepspeed_adam":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps,
                                                       "weight_decay": t.weight_decay}}
    if not user:
        return ds
    ours = {"train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
            "gradient_accumulation_steps": "train.global_batch_size / (micro_batch_size x ranks)",
            "gradient_clipping": "train.grad_clip"}
    for key, where in ours.items():
        if key in user and user[key] != ds[key]:
            raise ValueError(f"ds_config sets {key}={user[key]}, which contradicts mom_dist's {where} "
                             f"(= {ds[key]}); remove it from the JSON and set it in the mom_dist config")
    user = {k: v for k, v in user.items() if k not in ours}
    stage = user.get("zero_optimization", {}).get("stage", p.zero_stage)
    if stage == 3:
        raise ValueError("ds_config zero_optimization.stage=3 is not supported with expert-parallel modules "
                         "(DeepSpeed: MoE not supported with Stage 3); use stage 1 or 2")
    if user.get("fp16", {}).get("enabled"):
        raise ValueError("ds_config fp16 is not supported (router softmax and balance loss need range); "
                         "use train.precision=bf16")
    for key in ("scheduler",):
        if key in user:
            raise ValueError(f"ds_config '{key}' is not supported: the warmup+cosine schedule comes from "
                             "train.lr/warmup_steps/steps/min_lr_ratio")
    return _merge(ds, user)


def load_user_ds_config(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"parallel.ds_config='{path}' does not exist")
    except json.JSONDecodeError as e:
        raise ValueError(f"parallel.ds_config='{path}' is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise ValueError(f"parallel.ds_config='{path}' must hold a JSON object")
    return data


# --------------------------------------------------------------------- optimizer
def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay weights and embeddings, not biases or LayerNorms (GPT-2/nanoGPT); module
    parameters go into DeepSpeed's MoE groups (reduced and partitioned per EDP group)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            last = name.rsplit(".", 2)
            is_norm = last[-1].startswith("ln_") or (len(last) > 1 and last[-2] in ("ln", "ln_f"))
            (no_decay if "bias" in last[-1] or is_norm else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------- clipping
class GlobalNormClipper:
    """Clip by the true global L2 norm over all parameters of the model.

    Non-module gradients are identical on every rank after reduction (counted once); module
    gradients are identical within an expert-data-parallel group and distinct across the EP
    group, so their squared norms are summed over the EP group.
    """

    def __init__(self, model, dims: ParallelDims, max_norm: float):
        self.dims, self.max_norm = dims, max_norm
        self.module_ids = {id(p) for c in model.chunks for pool in (c.attn_pool, c.ffn_pool)
                           for p in pool.parameters()}
        self.last_norm = 0.0

    def clip_param_grads(self, params) -> float:
        """ZeRO 0 fp32: gradients are full and reduced on every rank. Returns the norm before
        clipping."""
        grads = [(id(p), p.grad) for p in params if p.grad is not None]
        dev = grads[0][1].device
        module_sq = torch.zeros((), device=dev)
        other_sq = torch.zeros((), device=dev)
        for pid, g in grads:
            sq = g.detach().float().square().sum()
            if pid in self.module_ids:
                module_sq += sq
            else:
                other_sq += sq
        if self.dims.ep_group is not None and self.dims.ep_size > 1:
            dist.all_reduce(module_sq, group=self.dims.ep_group)  # each EP rank holds other modules
        norm = (module_sq + other_sq).sqrt()
        if self.max_norm > 0:  # grad_clip=0: the norm is still needed for the non-finite check
            coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
            for _, g in grads:
                g.mul_(coef.to(g.dtype))
        self.last_norm = float(norm)
        return self.last_norm


def _install_clipping(engine, model, dims: ParallelDims) -> GlobalNormClipper:
    """ZeRO 0 in fp32: replace the engine's clipping (an average of per-rank norms) by ours.
    ZeRO 1/2 compute the global norm correctly (module groups summed over every rank's
    partition) and keep DeepSpeed's clipping; the layout-invariance tests cover ZeRO 0/1/2 in
    fp32 with clipping active. The bf16 optimizers keep DeepSpeed's own norm.

    Non-finite gradients: DeepSpeed's ZeRO 1/2 optimizers (fp32: invalid global norm; bf16:
    ``check_grad_overflow``, on by default) and its bf16 optimizer skip the update, clear the
    gradients and report ``overflow``, upon which the engine counts a skipped step and does not
    advance the LR schedule. Its ZeRO-0 fp32 path has no such check, so there our step does the
    same: a non-finite global norm (the same value on every rank) drops the gradients and sets
    ``overflow``."""
    clipper = GlobalNormClipper(model, dims, engine.gradient_clipping())
    if not engine.zero_optimization() and not engine.bfloat16_enabled():
        engine.clip_fp32_gradients = lambda: None  # done in the step below, also when grad_clip=0
        optimizer, step = engine.optimizer, engine.optimizer.step

        def step_unless_nonfinite(*args, **kwargs):
            norm = clipper.clip_param_grads(engine.module.parameters())
            optimizer._global_grad_norm = norm  # the engine reports it (get_global_grad_norm)
            optimizer.overflow = not math.isfinite(norm)
            if optimizer.overflow:
                for p in engine.module.parameters():
                    p.grad = None
                return None
            return step(*args, **kwargs)

        optimizer.step = step_unless_nonfinite
    return clipper


def apply_recipe(engine, clipper: GlobalNormClipper, cfg: Config) -> None:
    """After a resume: make the optimizer follow this config's recipe (lr, schedule, betas, eps,
    weight decay, clipping) instead of the values restored from the checkpoint. The schedule
    function already reads ``cfg``; the current step's lr and the base lr are set here."""
    t = cfg.train
    sched = engine.lr_scheduler
    groups = engine.optimizer.param_groups
    lr = t.lr * lr_lambda(sched.last_epoch, t.warmup_steps, t.steps, t.min_lr_ratio)
    sched.base_lrs = [t.lr] * len(sched.base_lrs)
    sched._last_lr = [lr] * len(groups)
    for g in groups:
        g["lr"], g["betas"], g["eps"] = lr, t.betas, t.eps
        if g.get("weight_decay", 0.0) != 0.0:  # the no-decay groups stay at 0
            g["weight_decay"] = t.weight_decay
    if hasattr(engine.optimizer, "clip_grad"):  # DeepSpeed restores its clip value from the checkpoint
        engine.optimizer.clip_grad = t.grad_clip
    clipper.max_norm = t.grad_clip


# -------------------------------------------------------------------- initialize
def initialize(model, cfg: Config, dims: ParallelDims):
    """Wrap pools, build optimizer + schedule, and return (engine, clipper)."""
    import deepspeed

    wrap_pools_for_deepspeed(model, dims)
    user = load_user_ds_config(cfg.parallel.ds_config)
    ds_config = build_ds_config(cfg, dims, user)
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    if "optimizer" in ds_config:
        optimizer = None
        params = groups
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
        params = None

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, t.warmup_steps, t.steps, t.min_lr_ratio))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                           lr_scheduler=schedule, config=ds_config, dist_init_required=False)
    clipper = _install_clipping(engine, model, dims)
    return engine, clipper
