"""Routing telemetry of one optimizer step: counters on the device, one all-reduce at the end.

    tel = StepTelemetry(model, dims)          # at the start of a telemetry step
    for each micro-batch: tel.add(out.routing)  # device ops only, no host sync
    record = tel.reduce()                     # one all-reduce (every rank calls it), one host read

Per (chunk, routing step, pool): the picks of every router class (module load + SKIP), the
summed router entropy, capacity drops and the tokens routed; per (chunk, pool in attn / ffn /
all): the histogram of per-token depth (non-SKIP picks over the chunk's routing steps); the
micro-batch count; and each rank's all-to-all payload bytes (one slot per rank, so a SUM
reduction yields the per-rank vector). Everything is summed over every micro-batch of the step
on every rank, so the figures do not depend on the parallel layout (only the all-to-all bytes
and the per-EP-rank split do, by definition). The record format is documented in
docs/usage.md ("Routing telemetry").
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mom_dist.host_sync import to_host_list


def _dispatchers(model):
    return [c.dispatcher for c in model.chunks]


class StepTelemetry:
    def __init__(self, model, dims):
        self.cfg, self.model, self.dims = model.cfg, model, dims
        self.acc: torch.Tensor | None = None  # float64: counts of a large global batch stay exact
        self.rows: list[tuple] = []  # (chunk, step, pool, n_modules, n_classes, top_k) per record
        self.depth_rows: list[tuple] = []  # (chunk, pool, n_bins)
        for d in _dispatchers(model):  # bytes counted from here on belong to this step
            if hasattr(d, "bytes_sent"):
                d.bytes_sent = 0

    @torch.no_grad()
    def add(self, routing) -> None:
        """Accumulate one micro-batch's routing records (a MoMOutput.routing list)."""
        if not routing:
            return
        dev = routing[0].ids_TK.device
        pieces, rows = [], []
        depth: dict[tuple, torch.Tensor] = {}  # (chunk, pool) -> (T,) non-SKIP picks so far
        for r in routing:
            T, K = r.ids_TK.shape
            C = r.probs_TC.shape[-1]
            picks = r.ids_TK.reshape(-1)
            hist = torch.zeros(C, dtype=torch.float64, device=dev).scatter_add_(
                0, picks, torch.ones_like(picks, dtype=torch.float64))
            p = r.probs_TC.double()
            entropy_sum = -(p * p.clamp_min(1e-30).log()).sum()
            extra = torch.stack([entropy_sum, r.dropped.to(dev, torch.float64)])
            pieces += [hist, extra, torch.full((1,), float(T), dtype=torch.float64, device=dev)]
            rows.append((r.chunk, r.step, r.pool, r.n_modules, C, K))
            visited_T = (r.ids_TK < r.n_modules).sum(-1)
            for key in ((r.chunk, r.pool), (r.chunk, "all")):
                depth[key] = depth[key] + visited_T if key in depth else visited_T
        depth_rows = []
        for (chunk, pool), d_T in depth.items():
            n_bins = self._max_depth(pool) + 1
            pieces.append(torch.zeros(n_bins, dtype=torch.float64, device=dev).scatter_add_(
                0, d_T, torch.ones_like(d_T, dtype=torch.float64)))
            depth_rows.append((chunk, pool, n_bins))
        pieces.append(torch.ones(1, dtype=torch.float64, device=dev))  # micro-batch count
        vec = torch.cat(pieces)
        if self.acc is None:
            self.acc, self.rows, self.depth_rows = vec, rows, depth_rows
        else:
            assert rows == self.rows and depth_rows == self.depth_rows, "routing layout changed within a step"
            self.acc += vec

    def _max_depth(self, pool: str) -> int:
        cfg = self.cfg
        ka, kf = cfg.attn_router.top_k, cfg.ffn_router.top_k
        return cfg.n_steps * {"attn": ka, "ffn": kf, "all": ka + kf}[pool]

    @torch.no_grad()
    def reduce(self) -> dict:
        """Sum over ranks (a collective: every rank must call it) and build the record."""
        dims = self.dims
        assert self.acc is not None, "StepTelemetry.reduce() before any add()"
        a2a = torch.zeros(dims.world_size, dtype=torch.float64, device=self.acc.device)
        a2a[dims.rank] = float(sum(getattr(d, "bytes_sent", 0) for d in _dispatchers(self.model)))
        flat = torch.cat([self.acc, a2a])
        if dist.is_initialized() and dims.world_size > 1:
            dist.all_reduce(flat)
        v = to_host_list(flat)  # the one host read
        detail, pos = [], 0
        for chunk, step, pool, n_modules, C, K in self.rows:
            hist, (entropy_sum, dropped, tokens) = v[pos:pos + C], v[pos + C:pos + C + 3]
            pos += C + 3
            load = [int(x) for x in hist[:n_modules]]
            skip = int(sum(hist[n_modules:]))
            per_rank = [sum(load[e * n_modules // dims.ep_size:(e + 1) * n_modules // dims.ep_size])
                        for e in range(dims.ep_size)]
            mean = sum(per_rank) / len(per_rank)
            detail.append({
                "chunk": chunk, "step": step, "pool": pool, "n_modules": n_modules, "top_k": K,
                "tokens": int(tokens), "load": load, "skip": skip,
                "skip_rate": skip / max(tokens * K, 1), "dropped": int(dropped),
                "entropy": entropy_sum / max(tokens, 1), "ep_load": per_rank,
                "ep_load_max_over_mean": max(per_rank) / mean if mean > 0 else 1.0,
            })
        depth = []
        for chunk, pool, n_bins in self.depth_rows:
            depth.append({"chunk": chunk, "pool": pool, "hist": [int(x) for x in v[pos:pos + n_bins]]})
            pos += n_bins
        micro_batches = int(v[pos])
        per_rank_bytes = [int(x) for x in v[pos + 1:]]
        return {"detail": detail, "depth": depth, "micro_batches": micro_batches,
                "tokens": detail[0]["tokens"] if detail else 0,
                "a2a_bytes_sent": sum(per_rank_bytes), "a2a_bytes_per_rank": per_rank_bytes,
                "world_size": dims.world_size, "ep_size": dims.ep_size}


def summarize(tel: dict) -> dict:
    """Scalars of a telemetry record (progress line, TensorBoard, the report's time series)."""
    steps = tel["detail"]
    if not steps:
        return {}
    depth_means = []
    for d in tel["depth"]:
        if d["pool"] == "all" and sum(d["hist"]):
            depth_means.append(sum(i * n for i, n in enumerate(d["hist"])) / sum(d["hist"]))
    return {"skip_rate": sum(s["skip_rate"] for s in steps) / len(steps),
            "dropped": sum(s["dropped"] for s in steps),
            "router_entropy": sum(s["entropy"] for s in steps) / len(steps),
            "depth_mean": sum(depth_means) / len(depth_means) if depth_means else 0.0,
            "ep_load_imbalance": max(s["ep_load_max_over_mean"] for s in steps),
            "a2a_MB_sent": tel["a2a_bytes_sent"] / 2 ** 20}


def routing_record(tel: dict) -> dict:
    """The ``kind: routing`` metrics record: summary scalars + the full detail."""
    return {**summarize(tel), **tel}
