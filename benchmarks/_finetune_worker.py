"""Rank worker of ``benchmarks/finetune.py``: one tiny fine-tuning run, timed, with its memory."""

from __future__ import annotations

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mom_dist.parallel.local_launch import worker_main  # noqa: E402


def run(args: dict) -> dict:
    import torch
    import torch.distributed as dist

    from mom_dist.evaluate import finetune as ft
    from mom_dist.evaluate.tasks import TaskConfig

    task = TaskConfig.build(args["preset"], **args["task"])
    prepared = ft.prepare(args["source"], task, args["out"], args["overrides"])
    start = time.time()
    res = ft.finetune(prepared, log=lambda *a: None)
    total = time.time() - start
    rows = []
    if dist.get_rank() == 0:
        with open(os.path.join(args["out"], "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if '"finetune"' in line]
    # steady state: the logged windows after the first (which includes DeepSpeed's warm-up)
    windows = [r["steps_per_s"] for r in rows if r["step"] > args["log_interval"]]
    held = sum(p.numel() for p in ft.build_model(prepared).parameters())
    cfg = prepared.cfg.model
    module = sum(p.numel() for c in ft.build_model(prepared).chunks for pool in (c.attn_pool, c.ffn_pool)
                 for p in pool.parameters())
    out = {"total_s": total, "steps_per_s": sum(windows) / len(windows) if windows else None,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "params_held": held - module + module // prepared.cfg.parallel.ep_size, "params_total": held,
           "metrics": res["metrics"], "d_model": cfg.d_model}
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


if __name__ == "__main__":
    worker_main(globals())
