"""Metrics out of the trainer: JSON lines, TensorBoard, and a progress line (rank 0 only)."""

from __future__ import annotations

import json
import os
import sys
import time


class MetricsWriter:
    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            self.file = open(self.path, "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
                except ImportError:  # tensorboard is optional on clusters
                    print("[mom_dist] tensorboard not installed: metrics go to metrics.jsonl only", file=sys.stderr)

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def progress_line(step: int, total: int, v: dict) -> str:
    parts = [f"step {step:>6}/{total}", f"loss {v['loss']:.4f}", f"lm {v['lm_loss']:.4f}",
             f"lr {v['lr']:.2e}", f"grad {v['grad_norm']:.3f}", f"{v['tokens_per_s']:,.0f} tok/s"]
    return " | ".join(parts)
