"""The training loop: one entry point for one process, torchrun, ``deepspeed`` and ``mpirun``.

    cfg = load_config("configs/tiny.yaml"); summary = train(cfg)

Reads top to bottom: start the process group and DeepSpeed's expert/data groups -> check the
data against the model (before any collective) -> build the plain model with the same seed on
every rank -> (phase 2) initialise it from a GPT-2 -> apply expert parallelism -> DeepSpeed
engine -> resume if a checkpoint exists -> loop over optimizer steps (each = gradient
accumulation over this rank's micro-batches) with logging, telemetry, evaluation, checkpoints
and preemption -> final checkpoint and validation perplexity.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mom_dist.config import Config, dump_config
from mom_dist.model import MoMModel
from mom_dist.parallel import deepspeed_engine
from mom_dist.parallel.dims import build_parallel_dims
from mom_dist.parallel.expert_parallel import apply_expert_parallel
from mom_dist.parallel.runtime import init_distributed, watch_collectives
from mom_dist.train import lifecycle
from mom_dist.train.checkpoint import Checkpointer
from mom_dist.train.data import build_data
from mom_dist.train.metrics import MetricsWriter, progress_line
from mom_dist.train.telemetry import routing_telemetry, summarize


@dataclass
class TrainResult:
    steps_done: int
    final_loss: float
    valid_loss: float | None
    valid_ppl: float | None
    losses: list  # per-step training loss (global mean) of this run
    checkpoint: str | None
    engine: object = None  # the DeepSpeed engine (its .module is the model), for callers that inspect it
    stop: str | None = None  # None: finished train.steps; "preempted" | "stop_after": left early, saved


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward(engine, batch: dict):
    mask = batch.get("attention_mask")  # megatron's (B, 1, S, S), True = masked
    return engine(batch["tokens"], batch["labels"], loss_mask_BS=batch.get("loss_mask"),
                  position_ids_BS=batch.get("position_ids"),
                  attention_mask_BSL=mask.squeeze(1) if mask is not None else None)


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


@torch.no_grad()
def evaluate(engine, batches, n_batches: int, device) -> float | None:
    """Mean LM loss over this rank's share of the first ``n_batches`` validation micro-batches."""
    if n_batches <= 0 or batches is None:
        return None
    engine.eval()
    total = torch.zeros(2, device=device)
    for _ in range(n_batches):
        out = _forward(engine, _to(next(batches), device))
        total += torch.stack([out.lm_loss.float(), torch.ones((), device=device)])
    engine.train()
    total = _mean_over_ranks(total)
    return (total[0] / total[1]).item()


def train(cfg: Config, *, log=print) -> TrainResult:
    t, p = cfg.train, cfg.parallel
    init_distributed(p.backend, timeout_s=max(600.0, p.collective_timeout_s))
    dims = build_parallel_dims(p.ep_size)
    device = _device()
    # Set-up safe points: a preemption signal during set-up (imports, data, engine, load) makes
    # every rank leave together at the next one (lifecycle.PreemptedDuringSetup -> exit 75).
    lifecycle.safe_point(device, "process-group start")
    data = build_data(cfg, dims)  # validates data vs model: fails here, before the engine exists
    lifecycle.safe_point(device, "data set-up")
    ga = deepspeed_engine.gradient_accumulation(cfg, dims)

    torch.manual_seed(t.seed)  # identical initial weights on every rank, for any layout
    model = MoMModel(cfg.model)
    if t.init_from:
        from mom_dist.convert.checkpoints import init_from_source
        init_from_source(model, t.init_from)
    apply_expert_parallel(model, dims, p.capacity_factor if p.dispatcher == "capacity" else None)
    engine, clipper = deepspeed_engine.initialize(model, cfg, dims)
    lifecycle.safe_point(device, "engine set-up")
    torch.manual_seed(t.seed * 7919 + dims.rank + 1)  # dropout streams differ per rank

    if dims.rank == 0:
        os.makedirs(t.out_dir, exist_ok=True)
        dump_config(cfg, os.path.join(t.out_dir, "config.json"))
    ckpt = Checkpointer(t.out_dir, engine, dims, t.keep_last)
    state = ckpt.load(cfg.model)
    start_step = state["step"] if state else 0
    consumed = state["consumed_samples"] if state else 0
    if state:
        log(f"[mom_dist] resumed from step {start_step} ({consumed} samples consumed)")
    lifecycle.safe_point(device, "checkpoint load", f"{ckpt.dir} (step {start_step})" if state else None)
    watch_collectives(p.collective_timeout_s)  # set-up done: from here a silent rank ends the job
    metrics = MetricsWriter(t.out_dir, dims.rank == 0, t.tensorboard)
    train_batches = data.train(consumed)
    tokens_per_step = t.global_batch_size * t.seq_len
    losses, last_tag, step, preempted = [], None, start_step, False
    tick, last_logged = time.time(), start_step
    while step < t.steps:
        parts = torch.zeros(4, device=device)
        for _ in range(ga):
            out = _forward(engine, _to(next(train_batches), device))
            engine.backward(out.loss)
            engine.step()
            parts += torch.stack([out.loss.detach().float(), out.lm_loss.detach().float(),
                                  out.balance_loss.detach().float(), out.z_loss.detach().float()])
        step += 1
        consumed += t.global_batch_size
        parts = _mean_over_ranks(parts / ga)
        losses.append(parts[0].item())
        if step % t.log_interval == 0 or step == t.steps or step == start_step + 1:
            elapsed, n_steps = time.time() - tick, step - last_logged
            v = {"loss": parts[0].item(), "lm_loss": parts[1].item(), "balance_loss": parts[2].item(),
                 "z_loss": parts[3].item(), "lr": engine.get_lr()[0], "grad_norm": _grad_norm(engine, clipper),
                 "tokens_per_s": tokens_per_step * n_steps / max(elapsed, 1e-9), "consumed_samples": consumed}
            metrics.write("train", step, v)
            if dims.rank == 0:
                log(progress_line(step, t.steps, v))
            tick, last_logged = time.time(), step
        if step % t.telemetry_interval == 0:
            tel = routing_telemetry(out.routing, model, dims)
            metrics.write("routing", step, {**summarize(tel), "detail": tel["per_step"]})
        if step % t.eval_interval == 0 and step < t.steps:
            vl = evaluate(engine, data.valid(), t.eval_batches, device)
            if vl is not None:
                metrics.write("valid", step, {"loss": vl, "ppl": math.exp(min(vl, 50))})
                if dims.rank == 0:
                    log(f"[valid] step {step} loss {vl:.4f} ppl {math.exp(min(vl, 50)):.2f}")
        preempted = lifecycle.preempt_agreed(device)
        leaving = preempted or (t.stop_after is not None and step - start_step >= t.stop_after)
        if t.save_interval and (step % t.save_interval == 0 or step == t.steps or leaving):
            last_tag = ckpt.save(step, consumed, cfg.to_dict())
        if leaving and dims.rank == 0:
            log(f"[mom_dist] {'preemption signal' if preempted else 'train.stop_after reached'}: "
                f"checkpoint {last_tag} at step {step}; leaving")
        if leaving:
            break
    # A preempted job has seconds left: its checkpoint is written, skip the final evaluation.
    vl = None if preempted else evaluate(engine, data.valid(), t.eval_batches, device)
    ppl = math.exp(min(vl, 50)) if vl is not None else None
    if vl is not None:
        metrics.write("valid", step, {"loss": vl, "ppl": ppl})
        if dims.rank == 0:
            log(f"[valid] final: loss {vl:.4f} perplexity {ppl:.2f}")
    metrics.close()
    stop = None if step >= t.steps else ("preempted" if preempted else "stop_after")
    return TrainResult(step, losses[-1] if losses else float("nan"), vl, ppl, losses, last_tag, engine, stop)


def _grad_norm(engine, clipper) -> float:
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if norm is None or (isinstance(norm, float) and math.isnan(norm)):
        return clipper.last_norm
    return float(norm)
