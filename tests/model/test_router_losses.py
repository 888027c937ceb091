"""Router gradients by weighting mode, balance/z losses, MoE special case, KV cache."""

import pytest
import torch
import torch.nn.functional as F

from mom_dist.model import ModelConfig, MoMModel, RouterConfig
from mom_dist.model.generate import generate_greedy
from mom_dist.model.layers import gelu
from mom_dist.model.losses import balance_loss

V = 40


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, max_seq_len=16, d_model=16, n_heads=2, n_bottom=1, n_top=1, n_attn_modules=3,
                n_ffn_modules=3, n_steps=3)
    base.update(kw)
    return ModelConfig(**base)


def router_lm_grads(weighting: str, k: int) -> list[torch.Tensor]:
    router = RouterConfig(top_k=k, dim=8, weighting=weighting)
    model = MoMModel(tiny(attn_router=router, ffn_router=router, balance_coef=0.0))
    ids = torch.randint(0, V, (2, 12))
    model(ids, ids).loss.backward()
    return [p.grad for n, p in model.named_parameters() if "router" in n]


def test_reference_weighting_gives_routers_no_lm_gradient_at_k1():
    grads = router_lm_grads("renorm", 1)
    assert all(g is None or g.abs().max() == 0 for g in grads)


@pytest.mark.parametrize("weighting,k", [("straight_through", 1), ("raw", 1), ("renorm", 2)])
def test_gradient_passing_weightings_train_the_routers(weighting, k):
    grads = router_lm_grads(weighting, k)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_straight_through_forward_equals_reference():
    torch.manual_seed(1)
    ref = MoMModel(tiny(attn_router=RouterConfig(weighting="renorm", top_k=2),
                        ffn_router=RouterConfig(weighting="renorm", top_k=2)))
    st = MoMModel(tiny(attn_router=RouterConfig(weighting="straight_through", top_k=2),
                       ffn_router=RouterConfig(weighting="straight_through", top_k=2)))
    st.load_state_dict(ref.state_dict())
    ids = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(st(ids).logits, ref(ids).logits)


def test_balance_loss_uniform_and_collapsed():
    T, C = 60, 4
    uniform_p = torch.full((T, C), 1.0 / C)
    uniform_top1 = torch.arange(T) % C
    collapsed_p = F.one_hot(torch.zeros(T, dtype=torch.long), C).float()
    collapsed_top1 = torch.zeros(T, dtype=torch.long)
    for depthwise in (False, True):
        assert balance_loss([uniform_p] * 3, [uniform_top1] * 3, depthwise=depthwise,
                            double_softmax=False).item() == pytest.approx(1.0)
        assert balance_loss([collapsed_p] * 3, [collapsed_top1] * 3, depthwise=depthwise,
                            double_softmax=False).item() == pytest.approx(C)
    # The reference's second softmax flattens P: a collapsed router is barely penalised.
    weak = balance_loss([collapsed_p], [collapsed_top1], depthwise=False, double_softmax=True).item()
    assert weak == pytest.approx(C * torch.softmax(torch.tensor([1.0, 0, 0, 0]), 0)[0].item())
    assert weak < 0.5 * C


def test_depthwise_differs_from_pooled_when_steps_disagree():
    C = 2
    p0 = F.one_hot(torch.zeros(10, dtype=torch.long), C).float()
    p1 = F.one_hot(torch.ones(10, dtype=torch.long), C).float()
    t0, t1 = torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.long)
    pooled = balance_loss([p0, p1], [t0, t1], depthwise=False, double_softmax=False)
    depth = balance_loss([p0, p1], [t0, t1], depthwise=True, double_softmax=False)
    assert pooled.item() == pytest.approx(1.0) and depth.item() == pytest.approx(2.0)


def test_z_loss_is_added_with_its_coefficient():
    model = MoMModel(tiny(z_loss_coef=0.5, balance_coef=0.25))
    ids = torch.randint(0, V, (2, 8))
    out = model(ids, ids)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.25 * out.balance_loss + 0.5 * out.z_loss)
    assert out.z_loss > 0


@pytest.mark.parametrize("mask_skip_keys", [False, True])
@pytest.mark.parametrize("router", ["gru", "mlp"])
def test_kv_cache_generation_equals_recomputation(mask_skip_keys, router):
    r = RouterConfig(kind=router, top_k=2, dim=8, temperature=1.0)
    model = MoMModel(tiny(anchor=True, n_chunks=2, n_attn_modules=2, n_ffn_modules=4,
                          mask_skip_keys=mask_skip_keys, attn_router=r, ffn_router=r))
    prompt = torch.randint(0, V, (3, 4))
    with_cache = generate_greedy(model, prompt, 10, use_cache=True)
    without = generate_greedy(model, prompt, 10, use_cache=False)
    assert torch.equal(with_cache, without)


def test_moe_special_case_equals_hand_written_topk_moe():
    # Spec §7: N_A = 1, N_F = E, H = 1 per chunk, C = L chunks: every chunk is an MoE layer.
    E, K, L = 4, 2, 2
    attn = RouterConfig(kind="mlp", dim=8, top_k=1, allow_skip=False, schedule="diagonal")
    ffn = RouterConfig(kind="mlp", dim=8, top_k=K, allow_skip=False, weighting="renorm", temperature=1.0)
    model = MoMModel(tiny(n_bottom=0, n_top=0, n_chunks=L, n_attn_modules=1, n_ffn_modules=E, n_steps=1,
                          attn_router=attn, ffn_router=ffn)).eval()
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        x = model.wte(ids) + model.wpe(torch.arange(10))
        for chunk in model.chunks:
            a = chunk.attn_pool.unit(0)  # a dense GPT-2 attention sub-layer
            q, k, v = a.qkv(a.ln(x)).split(16, -1)
            att = F.scaled_dot_product_attention(*(t.view(2, 10, 2, 8).transpose(1, 2) for t in (q, k, v)),
                                                 is_causal=True).transpose(1, 2).reshape(2, 10, 16)
            x = x + a.proj(att)
            r = chunk.ffn_router
            logits = r.head(F.relu(r.hidden(x)))[..., :E]  # no SKIP class in a plain MoE
            top_p, top_i = logits.softmax(-1).topk(K, -1)
            top_p = top_p / top_p.sum(-1, keepdim=True)
            moe = torch.zeros_like(x)
            for e in range(E):
                m = chunk.ffn_pool.unit(e)
                y = m.proj(gelu(m.fc(m.ln(x))))
                moe += (top_p * (top_i == e)).sum(-1, keepdim=True) * y
            x = x + moe
        want = F.linear(model.ln_f(x), model.wte.weight)
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_keeps_loss_and_gradients():
    ids = torch.randint(0, V, (2, 12))
    plain = MoMModel(tiny(dropout=0.1))
    ckpt = MoMModel(tiny(dropout=0.1, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    torch.manual_seed(5)
    a = plain(ids, ids).loss
    a.backward()
    torch.manual_seed(5)
    b = ckpt(ids, ids).loss
    b.backward()
    torch.testing.assert_close(a, b)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_bf16_autocast_runs_and_stays_close():
    model = MoMModel(tiny())
    ids = torch.randint(0, V, (2, 12))
    ref = model(ids, ids).lm_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids, ids).lm_loss
    assert abs(low.item() - ref.item()) < 0.05


def test_packed_documents_with_reset_mask_equal_separate_documents():
    # megatron's reset_attention_mask + reset_position_ids: a packed sequence of two documents
    # gives each document the logits it has alone.
    model = MoMModel(tiny(anchor=True)).eval()
    a, b = torch.randint(0, V, (1, 6)), torch.randint(0, V, (1, 10))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([0] * 6 + [1] * 10)
    mask = (doc[:, None] != doc[None, :])[None]  # True = masked (other document)
    pos = torch.cat([torch.arange(6), torch.arange(10)])[None]
    with torch.no_grad():
        out = model(packed, attention_mask_BSL=mask, position_ids_BS=pos).logits
        torch.testing.assert_close(out[:, :6], model(a).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 6:], model(b).logits, rtol=1e-5, atol=1e-5)
