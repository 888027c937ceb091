"""Local dispatch == a naive per-module loop that implements spec §5 literally."""

import pytest
import torch

from mom_dist.model import ModelConfig, MoMModel, RouterConfig
from mom_dist.model.dispatch import LocalDispatcher, capacity_for
from mom_dist.model.layers import causal_attention, gelu
from mom_dist.model.router import RouterOutput

D, HEADS = 16, 2


def chunk_model(n_a, n_f, k, **kw):
    cfg = ModelConfig(vocab_size=50, max_seq_len=16, d_model=D, n_heads=HEADS, n_bottom=0, n_top=0,
                      n_attn_modules=n_a, n_ffn_modules=n_f, n_steps=1,
                      attn_router=RouterConfig(top_k=k, dim=8), ffn_router=RouterConfig(top_k=k, dim=8), **kw)
    model = MoMModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.chunks[0]


def forced(ids_TK, weights_TK):
    return RouterOutput(torch.zeros(ids_TK.shape[0], 1), torch.zeros(ids_TK.shape[0], 1), ids_TK, weights_TK, None)


def naive_step(chunk, x_TD, ra, rf, B, S, kept_a=None, kept_f=None):
    """Spec §5 for every token, one module at a time, no grouping."""
    cfg = chunk.cfg
    T = x_TD.shape[0]
    qkv = torch.zeros(T, 3 * D)
    kept_a = kept_a if kept_a is not None else torch.ones_like(ra.ids_TK, dtype=torch.bool)
    kept_f = kept_f if kept_f is not None else torch.ones_like(rf.ids_TK, dtype=torch.bool)
    for t in range(T):
        for slot, i in enumerate(ra.ids_TK[t].tolist()):
            if i < cfg.n_attn_modules and kept_a[t, slot]:
                m = chunk.attn_pool.unit(i)
                w = ra.weights_TK[t, slot] if cfg.qkv_weighted else 1.0
                qkv[t] += w * m.qkv(m.ln(x_TD[t]))
    q, k, v = qkv.view(B, S, 3 * D).split(D, -1)
    keep = (ra.ids_TK < cfg.n_attn_modules).any(-1).view(B, S) if cfg.mask_skip_keys else None
    attn = causal_attention(q, k, v, HEADS, key_keep_BL=keep).reshape(T, D)
    x = x_TD.clone()
    for t in range(T):
        for slot, i in enumerate(ra.ids_TK[t].tolist()):
            if i < cfg.n_attn_modules and kept_a[t, slot]:
                x[t] += ra.weights_TK[t, slot] * chunk.attn_pool.unit(i).proj(attn[t])
    out = x.clone()
    for t in range(T):
        for slot, j in enumerate(rf.ids_TK[t].tolist()):
            if j < cfg.n_ffn_modules and kept_f[t, slot]:
                m = chunk.ffn_pool.unit(j)
                out[t] += rf.weights_TK[t, slot] * m.proj(gelu(m.fc(m.ln(x[t]))))
    return out


def run_forced(chunk, x_TD, ra, rf, B, S):
    chunk.attn_router.forward = lambda x, s, step: ra
    chunk.ffn_router.forward = lambda x, s, step: rf
    out = chunk.routing_step(x_TD, None, None, 0, (B, S), None, None)
    return out[0], out[3], out[4]


CASES = [  # (N_A, N_F, K, ids generator)
    (3, 5, 2, "random"),
    (4, 4, 5, "all_classes"),  # K = N + 1
    (4, 2, 1, "empty_modules"),
    (3, 3, 2, "all_skip_tokens"),
]


def make_ids(kind, T, K, n_classes, n_a):
    if kind == "all_classes":
        return torch.stack([torch.randperm(n_classes)[:K] for _ in range(T)])
    ids = torch.stack([torch.randperm(n_classes)[:K] for _ in range(T)])
    if kind == "empty_modules":
        ids = torch.where(ids == 1, n_classes - 1, ids)  # nobody picks module 1
    if kind == "all_skip_tokens":
        ids[::3] = torch.arange(n_a, n_a + K) if n_a + K <= n_classes else n_classes - 1
    return ids


@pytest.mark.parametrize("n_a,n_f,k,kind", CASES)
@pytest.mark.parametrize("qkv_weighted", [False, True])
@pytest.mark.parametrize("grouped", ["on", "off"])
def test_local_dispatch_equals_naive_loop(n_a, n_f, k, kind, qkv_weighted, grouped):
    chunk = chunk_model(n_a, n_f, k, qkv_weighted=qkv_weighted, grouped_gemm=grouped,
                        mask_skip_keys=(kind == "all_skip_tokens"))
    B, S = 2, 6
    T, C = B * S, chunk.cfg.n_classes
    x = torch.randn(T, D)
    ra = forced(make_ids(kind, T, k, C, n_a), torch.rand(T, k))
    rf = forced(make_ids(kind, T, k, C, n_f), torch.rand(T, k))
    got, _, _ = run_forced(chunk, x, ra, rf, B, S)
    with torch.no_grad():
        want = naive_step(chunk, x, ra, rf, B, S)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_local_dispatch_gradients_equal_naive_loop():
    chunk = chunk_model(3, 4, 2)
    B, S = 2, 5
    T = B * S
    x = torch.randn(T, D, requires_grad=True)
    w_a = torch.rand(T, 2, requires_grad=True)
    w_f = torch.rand(T, 2, requires_grad=True)
    ids_a, ids_f = make_ids("random", T, 2, 5, 3), make_ids("random", T, 2, 5, 4)
    got, _, _ = run_forced(chunk, x, forced(ids_a, w_a), forced(ids_f, w_f), B, S)
    grads = torch.autograd.grad(got.square().sum(), [x, w_a, w_f] + list(chunk.parameters()), allow_unused=True)
    want = naive_step(chunk, x, forced(ids_a, w_a), forced(ids_f, w_f), B, S)
    ref = torch.autograd.grad(want.square().sum(), [x, w_a, w_f] + list(chunk.parameters()), allow_unused=True)
    for g, r in zip(grads, ref):
        if r is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_capacity_mode_drops_overflow_in_token_order():
    chunk = chunk_model(2, 2, 1)
    chunk.dispatcher = LocalDispatcher(capacity_factor=0.5)
    B, S = 1, 8
    T = B * S
    x = torch.randn(T, D)
    ids_a = torch.zeros(T, 1, dtype=torch.long)  # all pick module 0: capacity ceil(.5*8/2)=2 keeps tokens 0, 1
    ids_f = torch.tensor([[0], [1], [2], [1], [1], [0], [1], [0]])  # 2 is SKIP
    cap = capacity_for(T, 1, 2, 0.5)
    kept_a = torch.zeros(T, 1, dtype=torch.bool)
    kept_a[:cap] = True
    kept_f = torch.tensor([[1], [1], [0], [1], [0], [1], [0], [0]], dtype=torch.bool)
    ra, rf = forced(ids_a, torch.ones(T, 1)), forced(ids_f, torch.ones(T, 1))
    got, rec_a, rec_f = run_forced(chunk, x, ra, rf, B, S)
    with torch.no_grad():
        want = naive_step(chunk, x, ra, rf, B, S, kept_a, kept_f)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert rec_a.dropped.item() == T - cap and rec_f.dropped.item() == 3


def test_local_plan_makes_no_host_sync_with_grouped_mm():
    from mom_dist.host_sync import count_host_syncs
    chunk = chunk_model(4, 4, 2)
    x = torch.randn(12, D)
    with count_host_syncs() as counter:
        chunk.routing_step(x, chunk.attn_router.initial_state(x), None, 0, (2, 6), None, None)
    assert counter.total == 0, counter.ops
