"""Metrics out of the trainer (rank 0 only): JSON lines, TensorBoard, the progress line, eval progress.

``metrics.jsonl`` is the record of a run (``mom-report`` reads it); TensorBoard gets the same
scalars and, at every telemetry step, routing figures as images and module loads / per-token
depth as histograms (the figures come from ``mom_dist.report.figures``, drawn headless).

One record per step: a launch that ended after its last checkpoint (killed, diverged) wrote
records for steps the next launch trains again. When a run starts from step S (its checkpoint,
or 0), ``drop_records_after`` moves the records past S - train, valid and routing telemetry
alike - to ``metrics.superseded.jsonl`` (kept, not lost), and TensorBoard purges its events
from step S+1 on (``purge_step``).
"""

from __future__ import annotations

import json
import os
import sys
import time


SUPERSEDED = "metrics.superseded.jsonl"


def drop_records_after(path: str, step: int) -> int:
    """Keep the records of steps <= ``step`` in ``path`` (rewritten atomically); append the others,
    and any unreadable line (a write cut short by a kill), to ``metrics.superseded.jsonl`` next to
    it. Returns how many lines moved."""
    try:
        with open(path) as f:
            lines = [x if x.endswith("\n") else x + "\n" for x in f if x.strip()]
    except FileNotFoundError:
        return 0
    keep, moved = [], []
    for line in lines:
        try:
            ok = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        (keep if ok else moved).append(line)
    if moved:
        with open(os.path.join(os.path.dirname(path), SUPERSEDED), "a") as f:  # first: a crash loses nothing
            f.writelines(moved)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(moved)


class MetricsWriter:
    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        """``resume_step``: the step this launch starts from (the trainer's 0 or the checkpoint's);
        records past it are superseded. None: append to what is there."""
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.superseded_path = os.path.join(out_dir, SUPERSEDED)
        self.superseded = 0  # records moved to superseded_path
        self.tb = None
        self.routing_history: list[dict] = []  # for the "change over training" figure in TensorBoard
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            if resume_step is not None:
                self.superseded = drop_records_after(self.path, resume_step)
            self.file = open(self.path, "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                            purge_step=None if resume_step is None else resume_step + 1)
                except ImportError:  # tensorboard is optional on clusters
                    print("[mom_dist] tensorboard not installed: metrics go to metrics.jsonl only", file=sys.stderr)

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def write_routing(self, step: int, record: dict) -> None:
        """A ``kind: routing`` record (see docs/usage.md) + its TensorBoard histograms and images."""
        if not self.enabled:
            return
        self.write("routing", step, record)
        if self.tb is not None:
            self.routing_history.append({"step": step, **record})
            _tensorboard_routing(self.tb, step, self.routing_history)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _tensorboard_routing(tb, step: int, history: list[dict]) -> None:
    import numpy as np

    rec = history[-1]
    for key, ranges in _load_hist_ranges(rec).items():
        counts = np.asarray(ranges, dtype=np.float64)  # picks per module id (summed over routing steps)
        _add_hist(tb, f"routing_load/{key}", counts, step)
    for d in rec["depth"]:
        _add_hist(tb, f"routing_depth/chunk{d['chunk']}_{d['pool']}", np.asarray(d["hist"], dtype=np.float64), step)
    try:
        from mom_dist.report import figures
    except ImportError:  # matplotlib is optional for training
        return
    for name, fig in figures.telemetry_figures(history):
        tb.add_image(f"figures/{name}", figures.to_rgb(fig), step, dataformats="HWC")


def _load_hist_ranges(rec: dict) -> dict:
    out = {}
    for d in rec["detail"]:
        key = f"chunk{d['chunk']}_{d['pool']}"
        acc = out.setdefault(key, [0] * d["n_modules"])
        for i, n in enumerate(d["load"]):
            acc[i] += n
    return out


def _add_hist(tb, tag: str, counts, step: int) -> None:
    """A histogram whose bucket i is the integer value i with weight counts[i] (module id, depth)."""
    import numpy as np

    values = np.arange(len(counts), dtype=np.float64)
    n = counts.sum()
    if n <= 0:
        return
    tb.add_histogram_raw(tag, min=0.0, max=float(len(counts) - 1), num=float(n),
                         sum=float((values * counts).sum()), sum_squares=float((values ** 2 * counts).sum()),
                         bucket_limits=(values + 0.5).tolist(), bucket_counts=counts.tolist(), global_step=step)


def format_duration(seconds: float) -> str:
    """H:MM:SS (or M:SS under an hour)."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(step: int, total: int, v: dict, elapsed: float | None = None, eta: float | None = None) -> str:
    parts = [f"step {step:>6}/{total}", f"loss {v['loss']:.4f}", f"lm {v['lm_loss']:.4f}",
             f"lr {v['lr']:.2e}", f"grad {v['grad_norm']:.3f}", f"{v['tokens_per_s']:,.0f} tok/s"]
    if elapsed is not None:
        parts.append(f"elapsed {format_duration(elapsed)}")
    if eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    return " | ".join(parts)


class ETA:
    """Elapsed time of this launch and the time left, from the steps done since the first step
    of this launch finished (the first step carries one-off costs: JIT builds, allocator warm-up)."""

    def __init__(self, total: int):
        self.t0 = time.time()
        self.total = total
        self.first: tuple[int, float] | None = None  # (step, time) when the first step finished

    def update(self, step: int) -> tuple[float, float]:
        now = time.time()
        if self.first is None:
            self.first = (step, now)
            per_step = now - self.t0
        else:
            done = step - self.first[0]
            per_step = (now - self.first[1]) / done if done > 0 else now - self.t0
        return now - self.t0, per_step * max(self.total - step, 0)


def eval_progress(n: int, desc: str = "valid"):
    """``range(n)`` that shows a progress bar on rank 0 when stderr is a terminal (batch logs
    stay free of bar redraws; the trainer prints one summary line after evaluation)."""
    rank = 0
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            rank = dist.get_rank()
    except ImportError:
        pass
    if rank != 0 or not sys.stderr.isatty():
        return range(n)
    from tqdm import tqdm
    return tqdm(range(n), desc=f"[{desc}]", leave=False, file=sys.stderr, unit="batch", dynamic_ncols=True)
