"""Non-finite steps: skip them, count them, and stop a diverged run with a diagnosis.

A step is *non-finite* when its global loss (any of total, LM, balance, z; mean over ranks) is
not finite, or when the optimizer skipped its update because the global gradient norm was not
finite (DeepSpeed's overflow path, or ours on ZeRO-0 fp32; see
``deepspeed_engine._install_clipping``). Both are the same on every rank (an all-reduced loss,
a global norm), so every rank decides alike without another collective. A non-finite loss
makes the gradients non-finite too, so its update is skipped by that path; the weights stay
those of the last finite step. After ``train.max_nonfinite_steps`` consecutive non-finite
steps the run stops with ``TrainingDiverged`` (exit code 3), naming the step, the non-finite
losses and the routers/pools/layers whose gradients (recomputed on the last micro-batch) or
weights are not finite. The trainer never saves a checkpoint of a non-finite step; if
``latest`` was saved right before the first non-finite step (its update caused it), ``latest``
goes back to the checkpoint before (``Checkpointer.rollback_before``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from mom_dist.exit_codes import TrainingDiverged

LOSS_NAMES = ("loss", "lm_loss", "balance_loss", "z_loss")


def _part(name: str) -> str:
    """Diagnostic group of a parameter: a chunk's router or pool, else its top-level layer."""
    from mom_dist.parallel.deepspeed_engine import plain_state_key

    parts = plain_state_key(name).split(".")
    for i, p in enumerate(parts):
        if p.endswith(("_router", "_pool")):
            return ".".join(parts[:i + 1])
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


class NonFiniteGuard:
    def __init__(self, engine, max_steps: int):
        self.engine, self.max_steps = engine, max_steps
        self.streak = 0
        self.first_bad_step: int | None = None  # first step of the current streak
        self._skipped = engine.skipped_steps

    def check(self, step: int, parts: torch.Tensor) -> bool:
        """Record this optimizer step; True if it was non-finite (its update was skipped)."""
        skipped = self.engine.skipped_steps != self._skipped
        self._skipped = self.engine.skipped_steps
        finite_loss = bool(torch.isfinite(parts).all())
        if finite_loss and not skipped:
            self.streak = 0
            return False
        if self.streak == 0:
            self.first_bad_step = step
        self.streak += 1
        return True

    @property
    def diverged(self) -> bool:
        return self.streak >= self.max_steps

    def raise_diverged(self, step: int, parts: torch.Tensor, last_batch: dict, forward, ckpt):
        last_ckpt, suspect = ckpt.rollback_before(self.first_bad_step)
        losses = [f"{n}={v:.4g}" for n, v in zip(LOSS_NAMES, parts.tolist()) if not math.isfinite(v)]
        grads, weights = _nonfinite_parts(self.engine, last_batch, forward)
        where = []
        if losses:
            where.append("non-finite losses: " + ", ".join(losses))
        else:
            where.append("losses finite, global gradient norm not")
        where.append("non-finite gradients in: " + (", ".join(grads) if grads else "none found on the last micro-batch"))
        if weights:
            where.append("non-finite weights in: " + ", ".join(weights))
        raise TrainingDiverged(
            f"training diverged at step {step}: {self.streak} consecutive non-finite steps "
            f"(train.max_nonfinite_steps={self.max_steps}), their updates skipped; " + "; ".join(where)
            + (f". Latest checkpoint: {last_ckpt} (saved right before step {self.first_bad_step}, whose update may "
               "have caused this; no older one exists)" if suspect else
               f". Latest checkpoint: {last_ckpt or 'none'} (the newest finite state)")
            + "; lower train.lr or raise train.warmup_steps, then resume")


def _nonfinite_parts(engine, batch: dict, forward) -> tuple[list[str], list[str]]:
    """Names of the parameter groups with non-finite gradients (recomputed on ``batch``, without
    touching the engine's gradient buffers) or weights, over all ranks (every rank calls this)."""
    model = engine.module
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    bad_w = {_part(n) for n, p in named if not torch.isfinite(p.detach()).all()}
    bad_g = set()
    try:
        with torch.enable_grad():
            out = forward(model, batch)
            # autograd.grad returns the gradients instead of accumulating them into .grad, so the
            # engine's (already cleared) buffers and its reduction hooks are not involved.
            grads = torch.autograd.grad(out.loss, [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, grads):
            if g is not None and not torch.isfinite(g).all():
                bad_g.add(_part(n))
    except RuntimeError as e:  # e.g. reentrant activation checkpointing refuses autograd.grad
        bad_g.add(f"(not recomputed: {str(e).splitlines()[0][:80]})")
    found = [(sorted(bad_g), sorted(bad_w))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, (sorted(bad_g), sorted(bad_w)))
    return (sorted({x for g, _ in found for x in g}), sorted({x for _, w in found for x in w}))
