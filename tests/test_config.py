"""Config loading, overrides and validation: each impossible combination names its fix."""

import glob

import pytest

from mom_dist.config import load_config
from mom_dist.model import MoMModel


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml") + glob.glob("configs/paper/*.yaml")))
def test_every_preset_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.model.depth >= 1


def test_tiny_preset_builds_a_model_and_overrides_apply():
    cfg = load_config("configs/tiny.yaml", ["model.n_steps=2", "train.lr=1e-4", "model.ffn_router.top_k=1"])
    assert cfg.model.n_steps == 2 and cfg.train.lr == 1e-4 and cfg.model.ffn_router.top_k == 1
    assert MoMModel(cfg.model).num_parameters() > 0


BAD = [
    (["model.ffn_router.top_k=6"], r"ffn_router.top_k=6 exceeds the 5 classes.*K <= N\+1"),
    (["model.ffn_router.top_k=5", "model.ffn_router.allow_skip=false"], r"top_k=5 exceeds the 4 classes"),
    (["model.n_heads=5"], r"n_heads=5 must divide model.d_model=64"),
    (["model.n_attn_modules=0"], r"n_attn_modules=0: a pool needs at least 1 module"),
    (["model.n_ffn_modules=0"], r"n_ffn_modules=0: a pool needs at least 1 module"),
    (["train.seq_len=256"], r"train.seq_len=256 exceeds model.max_seq_len=128"),
    (["parallel.ep_size=3"], r"parallel.ep_size=3 must divide model.n_attn_modules=4.*\[1, 2, 4\]"),
    (["parallel.zero_stage=3"], r"zero_stage=3 is not supported: ZeRO-3"),
    (["model.attn_router.kind=lstm"], r"attn_router.kind='lstm' is not valid"),
    (["model.attn_router.schedule=diagonal", "model.attn_router.top_k=3"], r"diagonal schedule"),
    (["model.n_stepz=3"], r"unknown config key 'model.n_stepz'. Did you mean 'model.n_steps'"),
    (["model.dropout=1.5"], r"dropout=1.5 must be in \[0, 1\)"),
    (["train.precision=fp16"], r"train.precision='fp16' is not valid"),
    (["model.attn_router.temperature=0"], r"temperature=0(\.0)? must be > 0"),
    (["parallel.dispatcher=random"], r"parallel.dispatcher='random'"),
    (["train.betas=[0.9]"], r"train.betas"),
    (["train.compile=maybe"], r"train.compile='maybe' is not valid; choose one of 'auto', 'on', 'off'"),
    (["train.compile_backend=eager"], r"train.compile_backend='eager' is not valid"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_impossible_combinations_raise_with_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("configs/tiny.yaml", overrides)


def test_on_off_options_survive_yaml_booleans():
    # YAML 1.1 reads on/off as booleans; the on/off options get their words back
    cfg = load_config("configs/tiny.yaml", ["model.grouped_gemm=off", "train.compile=on"])
    assert cfg.model.grouped_gemm == "off" and cfg.train.compile == "on"
    assert load_config("configs/tiny.yaml").train.compile == "auto"


def test_missing_config_file_and_malformed_override():
    with pytest.raises(ValueError, match="does not exist"):
        load_config("configs/nope.yaml")
    with pytest.raises(ValueError, match="section.key=value"):
        load_config("configs/tiny.yaml", ["model.n_steps"])
