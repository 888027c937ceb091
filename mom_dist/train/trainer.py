"""The training loop: one entry point for one process, torchrun, ``deepspeed`` and ``mpirun``.

    cfg = load_config("configs/tiny.yaml"); summary = train(cfg)

Reads top to bottom: start the process group and DeepSpeed's expert/data groups -> check the
data against the model (before any collective) -> build the plain model with the same seed on
every rank -> (phase 2) initialise it from a GPT-2 -> apply expert parallelism -> DeepSpeed
engine -> torch.compile (``train.compile``) -> resume if a checkpoint exists -> loop over
optimizer steps (each = gradient accumulation over this rank's micro-batches) with logging,
telemetry, evaluation, checkpoints and preemption -> final checkpoint and validation perplexity.

Safety around that (docs/usage.md, "Checkpoint safety"): rank 0 locks ``out_dir`` before anything is
written (``checkpoint.run_lock``); a resume that would change the computation is refused before anything
is loaded (``resume_policy``), recipe changes are applied and logged; ``config.json`` is written
only once the run is accepted; non-finite steps (and, opt-in, loss spikes) are skipped and a
diverged run - or one whose validation loss is not finite - stops with exit code 3 without
saving (``divergence``). A step is validated before it is saved, so ``latest`` never holds
weights whose validation loss was not finite. On resume, ``metrics.jsonl`` keeps one record per
step (``metrics.drop_records_after``).
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
from mom_dist.model.compile import compile_model, compile_summary, compile_wanted
from mom_dist.parallel import deepspeed_engine
from mom_dist.parallel.dims import build_parallel_dims
from mom_dist.parallel.expert_parallel import apply_expert_parallel
from mom_dist.parallel.runtime import init_distributed, watch_collectives
from mom_dist.checkpoint.layout import latest_state
from mom_dist.checkpoint.run_lock import RunLock
from mom_dist.quiet import drop_stdout_lines
from mom_dist.train import lifecycle
from mom_dist.train.checkpoint import Checkpointer
from mom_dist.train.data import build_data
from mom_dist.train.divergence import NonFiniteGuard
from mom_dist.train.metrics import ETA, MetricsWriter, eval_progress, progress_line
from mom_dist.train.rank_stats import RankStats
from mom_dist.train.resume_policy import check_resume
from mom_dist.train.telemetry import StepTelemetry, routing_record


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
    ran: int = 0  # steps this launch ran (0: the checkpoint was already at train.steps)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward(engine, batch: dict):  # engine or plain module: same signature
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
def evaluate(engine, valid, dims, device) -> float | None:
    """Validation loss: the token-weighted mean LM loss over the first ``n`` validation
    micro-batches of the data's global stream (``valid = (n, get)``, ``get(m)`` = micro-batch m),
    the same samples for every layout. Data-parallel rank r evaluates m = r, r + dp, ...; in the
    last round ranks left without one re-run micro-batch 0 with weight 0 (the expert-parallel
    all-to-all needs every rank in every forward)."""
    if valid is None or valid[0] <= 0:
        return None
    n, get = valid
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    for i in eval_progress(-(-n // dims.dp_size), "valid"):
        m = i * dims.dp_size + dims.dp_rank
        batch = _to(get(m if m < n else 0), device)
        out = _forward(engine, batch)
        mask = batch.get("loss_mask")  # lm_loss is the mean over unmasked tokens: weight by their count
        tokens = mask.sum().double() if mask is not None else torch.tensor(float(batch["labels"].numel()),
                                                                          dtype=torch.float64, device=device)
        if m < n:
            total += torch.stack([out.lm_loss.double() * tokens, tokens])
    engine.train()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)  # every rank is its own data-parallel rank: each micro-batch counted once
    return (total[0] / total[1]).item()


def train(cfg: Config, *, log=print) -> TrainResult:
    stats = RankStats()  # MOM_DIST_RANK_STATS only: per-rank start-up times, collectives, memory
    with drop_stdout_lines():  # DeepSpeed's 'op built successfully' print, every CPU rank
        init_distributed(cfg.parallel.backend, timeout_s=max(600.0, cfg.parallel.collective_timeout_s))
    stats.mark("process_group")
    dims = build_parallel_dims(cfg.parallel.ep_size)
    stats.mark("groups")
    lock = RunLock.acquire(cfg.train.out_dir, dims.rank, log)  # before anything is written
    try:
        result = _train(cfg, dims, log, stats)
        stats.mark("end")
        stats.write(dims, steps=result.ran)
        return result
    finally:
        lock.release()


def _train(cfg: Config, dims, log, stats: RankStats) -> TrainResult:
    t, p = cfg.train, cfg.parallel
    device = _device()
    # Set-up safe points: a preemption signal during set-up (imports, data, engine, load) makes
    # every rank leave together at the next one (lifecycle.PreemptedDuringSetup -> exit 75).
    lifecycle.safe_point(device, "process-group start")
    resume = latest_state(t.out_dir)
    recipe_changes = check_resume(cfg, resume[1]["config"], f"'{t.out_dir}'") if resume else []
    data = build_data(cfg, dims)  # validates data vs model: fails here, before the engine exists
    lifecycle.safe_point(device, "data set-up")
    ga = deepspeed_engine.gradient_accumulation(cfg, dims)

    torch.manual_seed(t.seed)  # identical initial weights on every rank, for any layout
    model = MoMModel(cfg.model)
    if t.init_from:
        from mom_dist.checkpoint.sources import init_from_source
        init_from_source(model, t.init_from)
    apply_expert_parallel(model, dims, p.capacity_factor if p.dispatcher == "capacity" else None)
    engine, clipper = deepspeed_engine.initialize(model, cfg, dims)
    compiled = compile_wanted(t.compile, device)
    if compiled:  # in place: the engine keeps calling the same module, with the same parameter names
        compile_model(engine.module, t.compile_backend)
    lifecycle.safe_point(device, "engine set-up")
    stats.mark("engine")
    torch.manual_seed(t.seed * 7919 + dims.rank + 1)  # dropout streams differ per rank

    ckpt = Checkpointer(t.out_dir, engine, dims, t.keep_last)
    state = ckpt.load(cfg.model, resume[0]) if resume else None
    start_step = state["step"] if state else 0
    consumed = state["consumed_samples"] if state else 0
    if state and recipe_changes:
        deepspeed_engine.apply_recipe(engine, clipper, cfg)
    if state and dims.rank == 0:
        log(f"[mom_dist] resumed from step {start_step} ({consumed} samples consumed)"
            + (f"; {state['resharded']}" if state.get("resharded") else "")
            + ("" if state["verified"] else "; written before checksums existed: its files are not verified"))
        for key, old, new in recipe_changes:
            log(f"[mom_dist] resume: {key} changed from {old} to {new}; applied from step {start_step + 1} on")
    lifecycle.safe_point(device, "checkpoint load", f"{ckpt.dir} (step {start_step})" if state else None)
    stats.mark("checkpoint_load")
    if dims.rank == 0:  # only now: a refused run leaves the previous config.json in place
        dump_config(cfg, os.path.join(t.out_dir, "config.json"))
    watch_collectives(p.collective_timeout_s)  # set-up done: from here a silent rank ends the job
    # The config each checkpoint records, with the directory its relative paths (data, tokenizer)
    # are relative to: the tools that read the run resolve them from anywhere (convert/model_tokenizer).
    saved_config = {**cfg.to_dict(), "workdir": os.getcwd()}
    metrics = MetricsWriter(t.out_dir, dims.rank == 0, t.tensorboard, resume_step=start_step)
    if metrics.superseded and dims.rank == 0:
        log(f"[mom_dist] metrics.jsonl: {metrics.superseded} records past step {start_step} (a launch that ended "
            f"after its last checkpoint) moved to {os.path.basename(metrics.superseded_path)}; those steps run again")
    train_batches = data.train(consumed)
    tokens_per_step = t.global_batch_size * t.seq_len
    losses, last_tag, step, preempted = [], None, start_step, False
    guard = NonFiniteGuard(engine, t.max_nonfinite_steps, t.max_loss_ratio, state.get("loss_window") if state else None)
    tick, last_logged = time.time(), start_step
    eta = ETA(t.steps)
    vl = ppl = None  # the final validation
    while step < t.steps:
        parts = torch.zeros(4, device=device)
        # Telemetry describes the whole step: every micro-batch on every rank (device counters).
        tel = StepTelemetry(model, dims) if (step + 1) % t.telemetry_interval == 0 else None
        for i in range(ga):
            batch = _to(next(train_batches), device)
            out = _forward(engine, batch)
            if tel is not None:
                tel.add(out.routing)
            parts += torch.stack([out.loss.detach().float(), out.lm_loss.detach().float(),
                                  out.balance_loss.detach().float(), out.z_loss.detach().float()])
            loss = out.loss
            if i == ga - 1:  # the step's global losses are known before its update (the spike guard's cue)
                parts = _mean_over_ranks(parts / ga)
                if guard.is_spike(parts):
                    loss = loss * float("nan")  # its update takes the non-finite path: skipped, counted
            engine.backward(loss)
            engine.step()
        step += 1
        consumed += t.global_batch_size
        stats.step(step, first=step == start_step + 1, engine=engine, dims=dims)
        losses.append(parts[0].item())
        nonfinite = guard.check(step, parts)
        if nonfinite and dims.rank == 0:
            log(f"[mom_dist] step {step}: {guard.why()}, update skipped ({guard.streak}/{t.max_nonfinite_steps} "
                "consecutive)")
        if guard.diverged:
            metrics.close()
            guard.raise_diverged(step, parts, batch, _forward, ckpt)
        if step % t.log_interval == 0 or step == t.steps or step == start_step + 1:
            elapsed, n_steps = time.time() - tick, step - last_logged
            v = {"loss": parts[0].item(), "lm_loss": parts[1].item(), "balance_loss": parts[2].item(),
                 "z_loss": parts[3].item(), "lr": engine.get_lr()[0], "grad_norm": _grad_norm(engine, clipper),
                 "tokens_per_s": tokens_per_step * n_steps / max(elapsed, 1e-9), "consumed_samples": consumed,
                 **({"skipped": True} if nonfinite else {})}
            metrics.write("train", step, v)
            if dims.rank == 0:
                log(progress_line(step, t.steps, v, *eta.update(step)))
                if compiled and step == start_step + 1:
                    log(f"[mom_dist] {compile_summary()} (the first step includes compiling: {elapsed:.1f} s)")
            tick, last_logged = time.time(), step
        if tel is not None:
            metrics.write_routing(step, routing_record(tel.reduce()))  # reduce(): a collective, all ranks
        preempted = lifecycle.preempt_agreed(device)
        leaving = preempted or (t.stop_after is not None and step - start_step >= t.stop_after)
        last = step >= t.steps or leaving
        # Validate before saving: a step whose validation loss is not finite is never `latest`.
        # A preempted job has seconds left: no validation, only its checkpoint.
        if not preempted and (last or (step % t.eval_interval == 0 and not nonfinite)):
            t_eval = time.time()
            loss_v = evaluate(engine, data.valid(), dims, device)
            if loss_v is not None:
                ppl_v = math.exp(min(loss_v, 50))
                metrics.write("valid", step, {"loss": loss_v, "ppl": ppl_v})
                if dims.rank == 0:
                    log(f"[valid] final: loss {loss_v:.4f} perplexity {ppl_v:.2f}" if last else
                        f"[valid] step {step} loss {loss_v:.4f} ppl {ppl_v:.2f} "
                        f"({t.eval_batches} batches, {time.time() - t_eval:.1f} s)")
                if not math.isfinite(loss_v):
                    metrics.close()
                    guard.raise_bad_validation(step, loss_v, parts, ckpt)
                if last:
                    vl, ppl = loss_v, ppl_v
        if t.save_interval and (step % t.save_interval == 0 or step == t.steps or leaving):
            if nonfinite:  # never a skipped (non-finite, spiking) step as `latest`: the previous one stays
                if dims.rank == 0:
                    log(f"[mom_dist] step {step} was skipped: no checkpoint; latest stays {ckpt.latest_tag()}")
            else:
                stats.mark(f"save_start_{step}")
                last_tag = ckpt.save_checked(step, consumed, saved_config, loss=parts[0].item(),
                                             extra={"loss_window": list(guard.recent)})
                stats.mark(f"save_end_{step}")
        if leaving and dims.rank == 0:
            log(f"[mom_dist] {'preemption signal' if preempted else 'train.stop_after reached'}: "
                f"checkpoint {last_tag} at step {step}; leaving")
        if leaving:
            break
    if compiled and dims.rank == 0:
        log(f"[mom_dist] {compile_summary()} (whole run, evaluation included)")
    metrics.close()
    stop = None if step >= t.steps else ("preempted" if preempted else "stop_after")
    final_loss = losses[-1] if losses else (state or {}).get("loss", float("nan"))  # no step ran: the checkpoint's
    return TrainResult(step, final_loss, vl, ppl, losses, last_tag, engine, stop, ran=step - start_step)


def _grad_norm(engine, clipper) -> float:
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if norm is None or (isinstance(norm, float) and math.isnan(norm)):
        return clipper.last_norm
    return float(norm)
