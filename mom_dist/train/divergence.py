"""Non-finite steps and loss spikes: skip them, count them, and stop a diverged run with a diagnosis.

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

Loss spikes (opt-in, ``train.max_loss_ratio``): a step whose global loss, finite, exceeds
``max_loss_ratio`` x the *reference* - the median of the losses of the last ``SPIKE_WINDOW``
accepted steps (finite, not spikes, not skipped; the window is saved in ``mom_state.json`` and
restored on resume, so a resumed run decides alike) - is treated as a non-finite step: its
update is skipped (the trainer makes its backward non-finite, so it takes the same path),
it is counted in the same streak, and ``max_nonfinite_steps`` consecutive skipped steps stop
the run. No reference exists before the first accepted step.

A non-finite *validation* loss (periodic or final) means the weights after that step's update
are bad although the step's training loss was finite (a finite blow-up: loss 4e12, weights
5e9): the run stops at once with exit code 3 (nothing to skip: the update is done), before the
step is saved, naming the largest weight; ``latest`` stays the newest finite checkpoint.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch
import torch.distributed as dist

from mom_dist.exit_codes import TrainingDiverged

LOSS_NAMES = ("loss", "lm_loss", "balance_loss", "z_loss")
SPIKE_WINDOW = 20  # accepted steps whose median loss is the spike guard's reference


def _part(name: str) -> str:
    """Diagnostic group of a parameter: a chunk's router or pool, else its top-level layer."""
    from mom_dist.parallel.deepspeed_engine import plain_state_key

    parts = plain_state_key(name).split(".")
    for i, p in enumerate(parts):
        if p.endswith(("_router", "_pool")):
            return ".".join(parts[:i + 1])
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


class NonFiniteGuard:
    def __init__(self, engine, max_steps: int, max_loss_ratio: float | None = None, window: list | None = None):
        self.engine, self.max_steps, self.max_loss_ratio = engine, max_steps, max_loss_ratio
        self.streak = 0
        self.spikes = 0  # loss spikes in the current streak
        self.first_bad_step: int | None = None  # first step of the current streak
        self.recent = deque(window or [], maxlen=SPIKE_WINDOW)  # losses of the last accepted steps
        self.spike: tuple[float, float] | None = None  # (loss, reference) when this step is a spike
        self._skipped = engine.skipped_steps

    def reference(self) -> float | None:
        """The spike guard's reference loss: the median of the last accepted steps' losses."""
        return statistics.median(self.recent) if self.recent else None

    def is_spike(self, parts: torch.Tensor) -> bool:
        """Called with the step's global losses before its update: True if the loss is finite and
        over ``max_loss_ratio`` x the reference (its update must then be skipped)."""
        self.spike = None
        ref = self.reference() if self.max_loss_ratio else None
        if ref is not None:
            loss = parts[0].item()
            if math.isfinite(loss) and loss > self.max_loss_ratio * ref:
                self.spike = (loss, ref)
        return self.spike is not None

    def check(self, step: int, parts: torch.Tensor) -> bool:
        """Record this optimizer step; True if it was non-finite or a spike (its update was skipped)."""
        skipped = self.engine.skipped_steps != self._skipped
        self._skipped = self.engine.skipped_steps
        finite_loss = bool(torch.isfinite(parts).all())
        if finite_loss and not skipped and self.spike is None:
            self.streak, self.spikes = 0, 0
            self.recent.append(parts[0].item())
            return False
        if self.streak == 0:
            self.first_bad_step = step
        self.streak += 1
        self.spikes += self.spike is not None
        return True

    def why(self) -> str:
        """What made this step a skipped one (for the log line)."""
        if self.spike is None:
            return "non-finite loss or gradient norm"
        loss, ref = self.spike
        return (f"loss {loss:.4g} is over train.max_loss_ratio={self.max_loss_ratio:g} x {ref:.4g} (the median loss "
                f"of the last {len(self.recent)} accepted steps)")

    @property
    def diverged(self) -> bool:
        return self.streak >= self.max_steps

    def raise_diverged(self, step: int, parts: torch.Tensor, last_batch: dict, forward, ckpt):
        last_ckpt, suspect = ckpt.rollback_before(self.first_bad_step)
        losses = [f"{n}={v:.4g}" for n, v in zip(LOSS_NAMES, parts.tolist()) if not math.isfinite(v)]
        grads, weights = _nonfinite_parts(self.engine, last_batch, forward)
        where = []
        if self.spikes:
            where.append(f"{self.spikes} of them loss spikes (the last: {self.why()})")
        if losses:
            where.append("non-finite losses: " + ", ".join(losses))
        elif self.spike is None:
            where.append("losses finite, global gradient norm not")
        where.append("non-finite gradients in: " + (", ".join(grads) if grads else "none found on the last micro-batch"))
        if weights:
            where.append("non-finite weights in: " + ", ".join(weights))
        what = "non-finite steps" if not self.spikes else "non-finite or loss-spike steps"
        raise TrainingDiverged(
            f"training diverged at step {step}: {self.streak} consecutive {what} "
            f"(train.max_nonfinite_steps={self.max_steps}), their updates skipped; " + "; ".join(where)
            + (f". Latest checkpoint: {last_ckpt} (saved right before step {self.first_bad_step}, whose update may "
               "have caused this; no older one exists)" if suspect else
               f". Latest checkpoint: {last_ckpt or 'none'} (the newest finite state)")
            + "; lower train.lr or raise train.warmup_steps, then resume")


    def raise_bad_validation(self, step: int, valid_loss: float, parts: torch.Tensor, ckpt):
        """The validation loss after step ``step`` is not finite: stop (every rank calls this)."""
        last_ckpt, _ = ckpt.rollback_before(step + 1)  # the step itself is not saved: nothing suspect
        largest, where = _largest_weight(self.engine.module)
        bad = _nonfinite_parts(self.engine, None, None)[1]
        raise TrainingDiverged(
            f"training diverged at step {step}: the validation loss is {valid_loss} while the step's training loss "
            f"was {parts[0].item():.4g}: the weights after its update do not give a finite loss (largest |weight| "
            f"{largest:.3g}, in {where}" + (f"; non-finite weights in: {', '.join(bad)}" if bad else "")
            + f"); step {step} is not saved. Latest checkpoint: {last_ckpt or 'none'} (the newest finite state); lower "
            "train.lr or raise train.warmup_steps (train.max_loss_ratio skips loss spikes), then resume")


def _largest_weight(model) -> tuple[float, str]:
    """(largest |weight|, its parameter group) over all ranks (every rank calls this)."""
    def size(x: tuple) -> float:
        return x[0] if x[0] == x[0] else math.inf  # nan counts as the largest

    found = [(p.detach().abs().max().item(), _part(n)) for n, p in model.named_parameters() if p.numel()]
    best = max(found, key=size, default=(0.0, "no parameters"))
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, best)
        best = max(found, key=size)
    return best


def _nonfinite_parts(engine, batch: dict | None, forward) -> tuple[list[str], list[str]]:
    """Names of the parameter groups with non-finite gradients (recomputed on ``batch``, without
    touching the engine's gradient buffers; none when ``batch`` is None) or weights, over all
    ranks (every rank calls this)."""
    model = engine.module
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    bad_w = {_part(n) for n, p in named if not torch.isfinite(p.detach()).all()}
    bad_g = set()
    if batch is not None:
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
