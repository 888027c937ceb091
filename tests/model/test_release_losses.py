"""The release's options (issue 10): GRU router output bias and the release's balance-loss
reduction, checked against a small reference written here from the release's description:

    aux = L(attn) + L(ffn), L = C * sum_i f_i * P_i over q = softmax(router probabilities)
    pooled:    L(pool) over the probabilities of every step of every chunk, concatenated
    depthwise: (1 / (chunks x steps)) * sum over (chunk, step) of [L(attn at it) + L(ffn at it)]
    total = lm + router_aux_loss_coef * aux
"""

import pytest
import torch

from mom_dist.config import load_config
from mom_dist.model import ModelConfig, MoMModel, RouterConfig

V = 40


def release_like(**kw) -> ModelConfig:
    r = RouterConfig(kind="gru", dim=8, top_k=1, temperature=0.5, weighting="renorm")
    base = dict(vocab_size=V, max_seq_len=16, d_model=16, n_heads=2, n_bottom=1, n_top=1, n_chunks=2,
                n_attn_modules=2, n_ffn_modules=3, n_steps=3, attn_router=r, ffn_router=r, router_bias=True,
                balance_coef=0.01, balance_double_softmax=True, balance_reduction="release")
    base.update(kw)
    return ModelConfig(**base)


def reference_aux(routing, depthwise: bool) -> torch.Tensor:
    """The release's auxiliary loss from the per-(chunk, step) router probabilities."""
    def one(probs_TC):
        C = probs_TC.shape[-1]
        q = torch.softmax(probs_TC, -1)  # the release's second softmax
        f = torch.nn.functional.one_hot(q.argmax(-1), C).float().mean(0)
        return C * (f * q.mean(0)).sum()

    steps = sorted({(r.chunk, r.step) for r in routing})
    by = {(r.chunk, r.step, r.pool): r.probs_TC for r in routing}
    if depthwise:
        return sum(one(by[c, h, "attn"]) + one(by[c, h, "ffn"]) for c, h in steps) / len(steps)
    return sum(one(torch.cat([by[c, h, pool] for c, h in steps])) for pool in ("attn", "ffn"))


def randomised(model: MoMModel) -> MoMModel:
    """Spread the router scores (a non-zero output bias included) so picks differ across steps."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("mode", ["pooled", "depthwise"])
def test_release_reduction_equals_reference_loss_and_gradients(mode):
    model = randomised(MoMModel(release_like(balance_mode=mode)))
    ids = torch.randint(0, V, (3, 10))
    out = model(ids, ids)
    ref = reference_aux(out.routing, depthwise=mode == "depthwise")
    torch.testing.assert_close(out.balance_loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * ref, rtol=1e-6, atol=1e-7)
    # the routers' gradients are those of the reference's total loss
    params = [p for n, p in model.named_parameters() if "router" in n]
    got = torch.autograd.grad(out.loss, params, retain_graph=True)
    want = torch.autograd.grad(out.lm_loss + 0.01 * ref, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    assert sum(float(g.abs().sum()) for g in got) > 0


@pytest.mark.parametrize("mode", ["pooled", "depthwise"])
def test_mean_reduction_is_half_the_release_sum_for_one_chunk(mode):
    # Coefficient semantics: with one chunk, our default averages two routers where the release
    # adds them, so the release's coefficient is twice ours.
    release = randomised(MoMModel(release_like(n_chunks=1, balance_mode=mode)))
    mean = MoMModel(release_like(n_chunks=1, balance_mode=mode, balance_reduction="mean"))
    mean.load_state_dict(release.state_dict())
    ids = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(release(ids, ids).balance_loss, 2 * mean(ids, ids).balance_loss)


def test_pooled_release_reduction_pools_across_chunks():
    # Two chunks whose routers disagree: pooling across chunks differs from averaging per chunk.
    model = randomised(MoMModel(release_like()))
    with torch.no_grad():  # chunk 0 prefers class 0, chunk 1 class 1 (both pools)
        for c, cls in ((0, 0), (1, 1)):
            for r in (model.chunks[c].attn_router, model.chunks[c].ffn_router):
                r.head_bias.zero_()[cls] = 50.0
    ids = torch.randint(0, V, (2, 12))
    out = model(ids, ids)
    per_chunk = MoMModel(release_like(balance_reduction="mean"))
    per_chunk.load_state_dict(model.state_dict())
    mean = per_chunk(ids, ids).balance_loss
    assert not torch.allclose(out.balance_loss, 2 * mean, rtol=1e-3)
    torch.testing.assert_close(out.balance_loss, reference_aux(out.routing, depthwise=False))


def test_router_bias_is_zero_at_init_and_changes_picks_when_trained():
    torch.manual_seed(3)
    plain = MoMModel(release_like(router_bias=False))
    torch.manual_seed(3)
    biased = MoMModel(release_like())
    names = {n for n, _ in biased.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert names == {f"chunks.{c}.{r}_router.head_bias" for c in (0, 1) for r in ("attn", "ffn")}
    assert all(float(biased.get_parameter(n).detach().abs().max()) == 0 for n in names)
    ids = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(biased(ids).logits, plain(ids).logits, rtol=0, atol=0)
    with torch.no_grad():
        biased.chunks[0].ffn_router.head_bias[2] = 100.0  # module 2 wins every FFN pick of chunk 0
    picks = [r.ids_TK for r in biased(ids).routing if r.chunk == 0 and r.pool == "ffn"]
    assert all(bool((p == 2).all()) for p in picks)
    assert not torch.allclose(biased(ids).logits, plain(ids).logits)


def test_release_config_reproduces_the_release_losses():
    m = load_config("configs/mom-release.yaml").model
    assert (m.router_bias, m.balance_double_softmax, m.balance_reduction, m.balance_mode) == \
        (True, True, "release", "pooled")
    assert m.balance_coef == 0.01 and m.z_loss_coef == 0
    assert m.attn_router.weighting == m.ffn_router.weighting == "renorm"
    with pytest.raises(ValueError, match="balance_reduction='sum' is not valid"):
        load_config("configs/mom-release.yaml", ["model.balance_reduction=sum"])
