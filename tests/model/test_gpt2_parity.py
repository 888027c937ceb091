"""Vanilla special case and phase-2 init against transformers' GPT-2 (spec §7, §8)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mom_dist.convert.gpt2 import init_mom_from_gpt2
from mom_dist.model import ModelConfig, MoMModel, RouterConfig, gpt2_config

V, P, D, HEADS = 97, 24, 32, 4


def hf_gpt2(n_layers: int) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=V, n_positions=P, n_embd=D, n_layer=n_layers, n_head=HEADS,
                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make LayerNorms and biases non-trivial so a missed copy shows
        for name, p in model.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def diagonal(**kw) -> RouterConfig:
    return RouterConfig(kind=kw.pop("kind", "gru"), dim=8, top_k=1, allow_skip=False, schedule="diagonal",
                        weighting="renorm", **kw)


@pytest.mark.parametrize("n_layers", [2, 5])
def test_vanilla_equals_transformers_gpt2(n_layers):
    hf = hf_gpt2(n_layers)
    mom = MoMModel(gpt2_config(D, HEADS, n_layers, vocab_size=V, max_seq_len=P)).eval()
    init_mom_from_gpt2(mom, hf)
    ids = torch.randint(0, V, (3, P))
    with torch.no_grad():
        diff = (mom(ids).logits - hf(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_vanilla_with_bottom_top_and_anchor_layers_equals_gpt2():
    # B=1, chunk of 2 modules run for 2 steps + anchor, T=1: 5 GPT-2 layers in order.
    cfg = ModelConfig(vocab_size=V, max_seq_len=P, d_model=D, n_heads=HEADS, n_bottom=1, n_top=1, n_chunks=1,
                      n_attn_modules=2, n_ffn_modules=2, n_steps=2, anchor=True,
                      attn_router=diagonal(), ffn_router=diagonal(kind="mlp"))
    hf = hf_gpt2(5)
    mom = MoMModel(cfg).eval()
    init_mom_from_gpt2(mom, hf)
    ids = torch.randint(0, V, (2, P))
    with torch.no_grad():
        assert (mom(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5


def phase2_cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, max_seq_len=P, d_model=D, n_heads=HEADS, n_bottom=1, n_top=1, n_chunks=2,
                       n_attn_modules=2, n_ffn_modules=2, n_steps=2, anchor=True,
                       attn_router=diagonal(), ffn_router=diagonal(), **kw)


def test_phase2_init_from_hf_directory_reproduces_source(tmp_path):
    hf = hf_gpt2(8)  # 1 + 2 * (2 + 1) + 1
    hf.save_pretrained(tmp_path / "gpt2")
    mom = MoMModel(phase2_cfg()).eval()
    init_mom_from_gpt2(mom, str(tmp_path / "gpt2"))
    ids = torch.randint(0, V, (2, P))
    with torch.no_grad():
        assert (mom(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    assert torch.equal(mom.ln_f.weight, hf.transformer.ln_f.weight)  # the reference forgets this one


def test_phase2_init_from_our_vanilla_checkpoint():
    src_cfg = gpt2_config(D, HEADS, 8, vocab_size=V, max_seq_len=P)
    src = MoMModel(src_cfg).eval()
    with torch.no_grad():
        src.ln_f.weight.mul_(1.5)
    mom = MoMModel(phase2_cfg()).eval()
    init_mom_from_gpt2(mom, src.state_dict(), source_cfg=src_cfg)
    ids = torch.randint(0, V, (2, P))
    with torch.no_grad():
        assert (mom(ids).logits - src(ids).logits).abs().max().item() <= 1e-5


def test_phase2_init_rejects_wrong_depth():
    mom = MoMModel(phase2_cfg())
    with pytest.raises(ValueError, match="source GPT-2 has 5 layers.*decomposes.*= 8"):
        init_mom_from_gpt2(mom, hf_gpt2(5))
