"""StepTelemetry in one process: no host syncs while accumulating, counts equal to a direct count."""

import torch

from mom_dist.host_sync import count_host_syncs
from mom_dist.model import ModelConfig, MoMModel, RouterConfig
from mom_dist.parallel.dims import ParallelDims
from mom_dist.train.telemetry import StepTelemetry, routing_record


def _model():
    cfg = ModelConfig(vocab_size=50, max_seq_len=8, d_model=16, n_heads=2, n_bottom=0, n_top=0, n_chunks=2,
                      n_attn_modules=4, n_ffn_modules=2, n_steps=3,
                      attn_router=RouterConfig(top_k=1, dim=8, temperature=0.5),
                      ffn_router=RouterConfig(top_k=2, dim=8, temperature=0.5))
    return MoMModel(cfg)


def test_accumulates_micro_batches_without_host_syncs():
    model = _model()
    dims = ParallelDims(1, 0, 1, None, None, None)
    tel = StepTelemetry(model, dims)
    outs = []
    with count_host_syncs() as syncs:
        for seed in range(3):
            ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(seed))
            out = model(ids, ids)
            n_before = syncs.total
            tel.add(out.routing)
            assert syncs.total == n_before  # accumulation is device work only
            outs.append(out.routing)
        rec = routing_record(tel.reduce())
    assert syncs.ops["tolist"] == 1
    assert rec["micro_batches"] == 3 and rec["tokens"] == 3 * 16
    assert len(rec["detail"]) == 2 * 3 * 2
    for d, rows in zip(rec["detail"], zip(*outs)):  # detail follows the model's record order
        ids = torch.cat([r.ids_TK for r in rows])
        n = d["n_modules"]
        assert d["load"] == [int((ids == m).sum()) for m in range(n)]
        assert d["skip"] == int((ids >= n).sum())
        probs = torch.cat([r.probs_TC for r in rows]).double()
        want = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean().item()
        assert abs(d["entropy"] - want) < 1e-9
    for dep in rec["depth"]:
        pools = ("attn", "ffn") if dep["pool"] == "all" else (dep["pool"],)
        per_mb = []
        for routing in outs:
            d_T = sum((r.ids_TK < r.n_modules).sum(-1) for r in routing if r.chunk == dep["chunk"] and r.pool in pools)
            per_mb.append(d_T)
        depth_T = torch.cat(per_mb)
        assert dep["hist"] == [int((depth_T == k).sum()) for k in range(len(dep["hist"]))]
    assert rec["a2a_bytes_sent"] == 0 and rec["ep_load_imbalance"] == 1.0
