"""The DeepSpeed engine's training state, as layout-free pieces and back.

Where the state lives depends on the layout; what is saved does not:

- ZeRO 1/2 (``DeepSpeedZeroOptimizer``; ``BF16_Optimizer``): fp32 masters and Adam moments are
  flat partitions of each param group over its data-parallel group (the EDP group for module
  pools). DeepSpeed links every parameter to its fragment of the partition (``_hp_mapping``:
  where the fragment starts in the parameter and in the partition); a rank owns exactly those.
- ZeRO 0 fp32: the parameters are the masters, the torch optimizer keeps state per parameter,
  replicated on every rank of the parameter's data-parallel group; replicas split the range
  evenly so each byte is written once (and every replica reads all of it back).
- ZeRO 0 bf16 (``FP16_UnfusedOptimizer``): fp32 copies per parameter, state on the copies,
  replicated likewise. DeepSpeed steps this optimizer once with zero gradients when it builds
  it, so its step counts run one ahead of the number of updates: saved counts are updates.

A parameter is named as in the single-process model (``plain_state_key``); a pool tensor of
shape (N_local, ...) stacked module-first is the slice [first, first + N_local) of the global
(N, ...) tensor, which is flat offset first * module_numel. Step counts are saved per
parameter; a ZeRO partition (one optimizer state for many parameters) takes their maximum.
The LR schedule and the engine's counters are plain numbers (``engine_scalars``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mom_dist.parallel.deepspeed_engine import plain_state_key
from mom_dist.parallel.dims import ParallelDims


@dataclass
class Fragment:
    """A range of one parameter's global flat tensor held by this rank, with its state."""
    name: str
    start: int  # global flat offset
    numel: int
    views: dict  # kind -> 1-D view: "param" (fp32 master) and the optimizer's tensor states
    state: dict  # the optimizer state dict that holds this fragment's step count
    step_offset: int = 0


@dataclass
class LocalParam:
    name: str  # single-process name
    param: torch.nn.Parameter  # the model's (lp) parameter on this rank
    global_shape: tuple
    start: int  # global flat offset of this rank's slice
    replicas: tuple  # (size, index) of the group holding identical copies (ZeRO 0)
    fragments: list = field(default_factory=list)


def _local_params(model, dims: ParallelDims) -> list[LocalParam]:
    out = []
    for wrapped, p in model.named_parameters():
        name = plain_state_key(wrapped)
        head = name.rsplit(".", 1)[0]
        if head.endswith("_pool"):
            pool = model.get_submodule(head)
            per_module = p.numel() // p.shape[0]
            out.append(LocalParam(name, p, (pool.n_global, *p.shape[1:]), pool.first * per_module,
                                  (dims.world_size // dims.ep_size, dims.rank // dims.ep_size)))
        else:
            out.append(LocalParam(name, p, tuple(p.shape), 0, (dims.world_size, dims.rank)))
    return out


def _tensor_states(state: dict, like: torch.Tensor) -> dict:
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == like.shape and k != "step"}


def _new_adam_state(opt, like: torch.Tensor) -> dict:
    """What the Adam optimizers we use create on their first step (their state is lazy):
    torch's keep the step as a float tensor, DeepSpeed's CPU/fused Adam as an int."""
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        step = torch.tensor(0.0, dtype=torch.float32)
    elif type(opt).__name__ in ("DeepSpeedCPUAdam", "FusedAdam"):
        step = 0
    else:
        raise ValueError(f"restoring optimizer state into {type(opt).__name__} before its first step is not "
                         "supported; use train.optimizer=adamw or deepspeed_adam")
    state = {"step": step, "exp_avg": torch.zeros_like(like), "exp_avg_sq": torch.zeros_like(like)}
    if any(g.get("amsgrad") for g in opt.param_groups):
        state["max_exp_avg_sq"] = torch.zeros_like(like)
    return state


def _split(length: int, replicas: tuple) -> tuple[int, int]:
    size, index = replicas
    lo, hi = index * length // size, (index + 1) * length // size
    return lo, hi - lo


def map_state(engine, dims: ParallelDims, *, for_save: bool, create: bool = False) -> list[LocalParam]:
    """This rank's parameters and the fragments of optimizer state it owns (``for_save``: the
    share it writes; else everything it must restore). ``create`` makes lazy state exist."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    params = _local_params(engine.module, dims)
    if isinstance(opt, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
        base = opt.optimizer  # ZeRO 1/2, BF16_Optimizer: one flat fp32 partition per param group
        for lp in params:
            m = lp.param._hp_mapping
            if m is None:  # another rank of the group owns all of this parameter
                continue
            flat = base.param_groups[m.param_group_index]["params"][0]
            if create and not base.state[flat]:
                base.state[flat] = _new_adam_state(base, flat)
            state = base.state[flat]
            hp_start, n = m.hp_fragment_address.start, m.lp_fragment_address.numel
            views = {"param": flat.narrow(0, hp_start, n)}
            views.update({k: v.narrow(0, hp_start, n) for k, v in _tensor_states(state, flat).items()})
            lp.fragments.append(Fragment(lp.name, lp.start + m.lp_fragment_address.start, n, views, state))
        return params
    if isinstance(opt, FP16_UnfusedOptimizer):  # bf16, ZeRO 0: fp32 copies per parameter
        masters = {id(lo): hi for los, his in zip(opt.fp16_groups, opt.fp32_groups) for lo, hi in zip(los, his)}
        base, step_offset = opt.optimizer, 1
    elif isinstance(opt, torch.optim.Optimizer):  # fp32, ZeRO 0: the parameters are the masters
        masters, base, step_offset = {}, opt, 0
    else:
        raise ValueError(f"checkpoints do not support DeepSpeed's {type(opt).__name__}; "
                         "use parallel.zero_stage 0, 1 or 2 with train.precision fp32 or bf16")
    for lp in params:
        master = masters.get(id(lp.param), lp.param)
        if create and not base.state[master]:
            base.state[master] = _new_adam_state(base, master)
        state = base.state[master]
        flat = master.data.view(-1)
        lo, n = _split(flat.numel(), lp.replicas) if for_save else (0, flat.numel())
        views = {"param": flat.narrow(0, lo, n)}
        views.update({k: v.view(-1).narrow(0, lo, n) for k, v in _tensor_states(state, master).items()})
        lp.fragments.append(Fragment(lp.name, lp.start + lo, n, views, state, step_offset))
    return params


def _get_step(frag: Fragment) -> int:
    if not frag.state:  # no update yet (torch's state is created by the first step)
        return 0
    step = frag.state.get("step", 0)
    step = int(step.item()) if torch.is_tensor(step) else int(step)
    return max(0, step - frag.step_offset)


def _set_step(frag: Fragment, value: int) -> None:
    old = frag.state.get("step")
    value += frag.step_offset
    frag.state["step"] = torch.tensor(float(value), dtype=old.dtype, device=old.device) \
        if torch.is_tensor(old) else value


def state_pieces(engine, dims: ParallelDims) -> tuple[list, dict, dict]:
    """(pieces [(kind, name, start, tensor)], global shapes, step counts) this rank writes."""
    pieces, shapes, steps = [], {}, {}
    for lp in map_state(engine, dims, for_save=True):
        shapes[lp.name] = lp.global_shape
        for frag in lp.fragments:
            steps[lp.name] = _get_step(frag)
            if frag.numel:
                pieces += [(kind, frag.name, frag.start, v) for kind, v in frag.views.items()]
    return pieces, shapes, steps


def restore_state(engine, dims: ParallelDims, reader) -> None:
    """Fill this rank's parameters, masters, optimizer moments and step counts from ``reader``
    (a ``ShardedState``), whatever layout wrote it."""
    params = map_state(engine, dims, for_save=False, create=True)
    for lp in params:
        saved = reader.shapes.get(lp.name)
        if saved is None or tuple(saved) != tuple(lp.global_shape):
            raise ValueError(f"checkpoint '{reader.tag_dir}' has parameter '{lp.name}' with shape {saved}, "
                             f"this model {list(lp.global_shape)}: it belongs to another model")
    steps: dict[int, int] = {}  # id(optimizer state) -> step (a ZeRO partition: its params' max)
    with torch.no_grad():
        for lp in params:
            full = reader.read("param", lp.name, lp.start, lp.param.numel())
            lp.param.data.copy_(full.view_as(lp.param))  # bf16 weights: the masters rounded, as DeepSpeed does
            for frag in lp.fragments:
                for kind, view in frag.views.items():
                    if kind == "param":
                        view.copy_(full.narrow(0, frag.start - lp.start, frag.numel))
                    elif kind in reader.kinds(lp.name) or reader.steps.get(lp.name, 0):
                        view.copy_(reader.read(kind, lp.name, frag.start, frag.numel))
                    # else: saved before its first update, when Adam's moments did not exist yet
                key = id(frag.state)
                steps[key] = max(steps.get(key, 0), reader.steps.get(lp.name, 0))
        for lp in params:
            for frag in lp.fragments:
                _set_step(frag, steps[id(frag.state)])


def engine_scalars(engine) -> dict:
    s = engine.lr_scheduler
    return {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps,
            "scheduler": {"last_epoch": s.last_epoch, "_step_count": s._step_count} if s is not None else None}


def restore_scalars(engine, saved: dict) -> None:
    """Counters, and the schedule at the saved step with this run's base learning rates."""
    engine.global_steps = saved["global_steps"]
    engine.global_samples = saved["global_samples"]
    engine.skipped_steps = saved["skipped_steps"]
    s = engine.lr_scheduler
    if s is not None and saved.get("scheduler"):
        s.last_epoch, s._step_count = saved["scheduler"]["last_epoch"], saved["scheduler"]["_step_count"]
        lrs = [base * fn(s.last_epoch) for base, fn in zip(s.base_lrs, s.lr_lambdas)]
        for group, lr in zip(s.optimizer.param_groups, lrs):
            group["lr"] = lr
        s._last_lr = lrs
