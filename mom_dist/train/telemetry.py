"""Routing telemetry: cheap per-(chunk, routing step, pool) statistics, every N steps.

From one micro-batch's routing records: module load histogram (picks per class), SKIP rate,
dropped pairs (capacity mode), mean router entropy, and - summed over all ranks with one
all-reduce - the load each EP rank's modules received (max/mean across EP ranks) and the
all-to-all payload bytes sent since the last report.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def routing_telemetry(routing, model, dims) -> dict:
    rows, packed = [], []
    for r in routing:
        C = r.probs_TC.shape[-1]
        picks = r.ids_TK.reshape(-1)
        hist = torch.zeros(C, dtype=torch.float32, device=picks.device).scatter_add_(
            0, picks, torch.ones_like(picks, dtype=torch.float32))
        p = r.probs_TC.float()
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        n = torch.tensor(float(picks.numel()), device=hist.device)
        packed.append(torch.cat([hist, torch.stack([entropy, r.dropped.float().to(hist.device), n])]))
        rows.append((r.chunk, r.step, r.pool, r.n_modules, C))
    a2a = sum(getattr(c.dispatcher, "bytes_sent", 0) for c in model.chunks)
    for c in model.chunks:
        if hasattr(c.dispatcher, "bytes_sent"):
            c.dispatcher.bytes_sent = 0
    dev = packed[0].device if packed else torch.device("cpu")
    flat = torch.cat(packed + [torch.tensor([float(a2a)], device=dev)])
    if dist.is_initialized() and dims.world_size > 1:
        dist.all_reduce(flat)
    out, pos = {"a2a_bytes_sent": flat[-1].item(), "per_step": []}, 0
    for (chunk, step, pool, n_modules, C), _ in zip(rows, packed):
        hist, entropy, dropped, n_picks = flat[pos:pos + C], flat[pos + C], flat[pos + C + 1], flat[pos + C + 2]
        pos += C + 3
        module_load = hist[:n_modules]
        per_rank = module_load.view(dims.ep_size, -1).sum(1)
        out["per_step"].append({
            "chunk": chunk, "step": step, "pool": pool,
            "load": [int(x) for x in module_load.tolist()],
            "skip_rate": float(hist[n_modules:].sum() / n_picks),
            "dropped": int(dropped), "entropy": float(entropy / dims.world_size),
            "ep_load_max_over_mean": float(per_rank.max() / per_rank.mean().clamp_min(1e-9)),
        })
    return out


def summarize(tel: dict) -> dict:
    """Scalars for the progress line and TensorBoard."""
    steps = tel["per_step"]
    if not steps:
        return {}
    return {"skip_rate": sum(s["skip_rate"] for s in steps) / len(steps),
            "dropped": sum(s["dropped"] for s in steps),
            "router_entropy": sum(s["entropy"] for s in steps) / len(steps),
            "ep_load_imbalance": max(s["ep_load_max_over_mean"] for s in steps),
            "a2a_MB_sent": tel["a2a_bytes_sent"] / 2 ** 20}
