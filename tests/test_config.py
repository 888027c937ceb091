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


# Types (issue 15): every field's type comes from its dataclass annotation; a wrong type is one
# ValueError naming the field, the value and what is expected, before validate() compares values.
TYPES = [
    (["train.steps=2.5"], "train.steps=2.5 must be an integer (default: 5000)"),
    (["train.steps=true"], "train.steps=true must be an integer"),
    (["train.steps=ten"], "train.steps='ten' must be an integer"),
    (["train.lr=fast"], "train.lr='fast' must be a number (default: 0.001)"),
    (["train.betas=0.9"], "train.betas=0.9 must be a list of 2 numbers (default: [0.9, 0.95])"),
    (["train.betas=[0.9, 0.95, 0.99]"], "train.betas=[0.9, 0.95, 0.99] must be a list of 2 numbers"),
    (["train.betas=[a, 0.95]"], "train.betas[0]='a' must be a number"),
    (["train.tensorboard=1"], "train.tensorboard=1 must be true or false"),
    (["train.out_dir=5"], "train.out_dir=5 must be a string (default: 'runs/default'); write '5' in quotes"),
    (["train.init_from=3"], "train.init_from=3 must be a string or null"),
    (["train.stop_after=2.5"], "train.stop_after=2.5 must be an integer or null"),
    (["train=5"], "train=5 must be a section (a mapping with keys among betas, "),
    (["model.attn_router=5"], "model.attn_router=5 must be a section (a mapping with keys among allow_skip, dim,"),
    (["model.attn_router="], "model.attn_router=null must be a section"),
    (["model.attn_router="], "in YAML is null: remove the key for the defaults"),
    (["model.attn_router.kind=[gru]"], "model.attn_router.kind=['gru'] must be a string"),
    (["model.d_model=null"], "model.d_model=null must be an integer"),
    (["model.anchor=yes please"], "model.anchor='yes please' must be true or false"),
    (["parallel.ep_size=1.5"], "parallel.ep_size=1.5 must be an integer"),
    (["parallel.collective_timeout_s=10m"], "parallel.collective_timeout_s='10m' must be a number"),
    (["data=3"], "data=3 must be a section (a mapping)"),
    (["data.seq_length=2.5"], "data.seq_length=2.5 must be an integer"),
    (["data.train_prefixes=[1, 2]"], "data.train_prefixes[0]=1 must be a string"),
    (["data.train_prefixes=3"], "data.train_prefixes=3 must be a list of strings or a string"),
    (["data.train_weights=[a]"], "data.train_weights[0]='a' must be a number"),
    (["data.cache_shared=1"], "data.cache_shared=1 must be true or false"),
    (["data.seq_len=3"], "unknown config key 'data.seq_len'. Did you mean 'data.seq_length'"),
    (["data={synthetic: {seed: 2.5}}"], "data.synthetic.seed=2.5 must be an integer"),
    (["train.betas=[0.9"], "override 'train.betas=[0.9': the value is not valid YAML (expected ',' or ']'"),
]


@pytest.mark.parametrize("overrides,message", TYPES)
def test_wrong_types_are_refused_naming_field_value_and_type(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config("configs/tiny.yaml", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_values_that_mean_the_same_are_converted():
    cfg = load_config("configs/tiny.yaml", ["train.steps=1e3", "parallel.ep_size=2.0", "train.lr=3", "train.betas=[0.8, 1]",
                                            "train.eps='1e-6'", "data.split=100", "data.valid_prefixes=null"])
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.parallel.ep_size == 2 and isinstance(cfg.parallel.ep_size, int)
    assert cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float) and cfg.train.betas == (0.8, 1.0)
    assert cfg.train.eps == 1e-6


def test_checker_derives_everything_from_annotations():
    from dataclasses import dataclass, field
    from typing import Optional, Union

    from mom_dist.config_utils import check_value, from_dict

    @dataclass
    class Inner:
        n: int = 1

    @dataclass
    class Outer:
        pair: tuple[int, str] = (1, "a")
        many: tuple[float, ...] = ()
        names: list[str] = field(default_factory=list)
        either: Union[list[str], str] = "x"
        maybe: Optional[float] = None
        inner: Inner = field(default_factory=Inner)
        raw: dict = field(default_factory=dict)

    ok = from_dict(Outer, {"pair": [2, "b"], "many": [1, 2.5], "names": ("p",), "either": "y", "maybe": 2,
                           "inner": {"n": 3.0}, "raw": {"k": [1]}}, "o.")
    assert ok == Outer((2, "b"), (1.0, 2.5), ["p"], "y", 2.0, Inner(3), {"k": [1]})
    for data, message in [({"pair": [1]}, r"o.pair=\[1\] must be a list of 2 values"),
                          ({"pair": [1, 2]}, r"o.pair\[1\]=2 must be a string"),
                          ({"many": 1.0}, "o.many=1.0 must be a list of numbers"),
                          ({"either": 3}, "o.either=3 must be a list of strings or a string"),
                          ({"maybe": "x"}, "o.maybe='x' must be a number or null"),
                          ({"inner": {"n": 0.5}}, "o.inner.n=0.5 must be an integer"),
                          ({"inner": {"m": 1}}, "unknown config key 'o.inner.m'"),
                          ({"raw": [1]}, r"o.raw=\[1\] must be a section \(a mapping\)")]:
        with pytest.raises(ValueError, match=message):
            from_dict(Outer, data, "o.")
    assert check_value("7", int, "x") == 7 and check_value(None, Optional[int], "x") is None
    with pytest.raises(ValueError, match="x=false must be a number"):
        check_value(False, float, "x")


def test_config_files_that_do_not_parse_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 64\n  n_heads 4\n  attn_router: {kind: gru\n")
    with pytest.raises(ValueError, match=r"config file '.*bad.yaml' is not valid YAML: .* at line \d+, column \d+; "
                                         "fix the syntax there") as err:
        load_config(str(bad))
    assert "\n" not in str(err.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_config(str(binary))
    with pytest.raises(ValueError, match="cannot be read"):
        load_config(str(tmp_path))  # a directory
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("model: 3\n")
    with pytest.raises(ValueError, match="model=3 must be a section"):
        load_config(str(scalar))
