"""Loader: deterministic order for any DP size, resume from consumed samples, EOD options, checks."""

import numpy as np
import pytest
import torch

from mom_dist.data.indexed import DataIntegrityError
from mom_dist.data.loader import DataConfig, build_data_iterators, write_token_documents

V, EOD = 97, 0


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    out = []
    for name, n in (("a", 200), ("b", 80)):
        docs = [list(rng.integers(1, V, rng.integers(3, 40))) + [EOD] for _ in range(n)]
        write_token_documents(str(d / name), docs, V, eod=EOD)
        out.append(str(d / name))
    return out


def config(prefixes, tmp_path, **kw):
    kw.setdefault("train_prefixes", prefixes)
    kw.setdefault("train_weights", [0.6, 0.4] if len(kw["train_prefixes"]) == 2 else None)
    return DataConfig(split="90,10,0", seq_length=16, seed=7, cache_dir=str(tmp_path / "cache"), **kw)


def micro_batches(cfg, dp_size, consumed=0, steps=3, G=8, b=2):
    """{(step, k): tokens} where k = j*dp_size + r is the micro-batch number in the global batch."""
    out = {}
    for r in range(dp_size):
        it = build_data_iterators(cfg, vocab_size=V, global_batch_size=G, micro_batch_size=b, dp_rank=r,
                                  dp_size=dp_size, train_samples=64, valid_samples=16,
                                  consumed_samples=consumed).train
        M = G // (b * dp_size)
        for step in range(steps):
            for j in range(M):
                out[(step, j * dp_size + r)] = next(it)["tokens"]
    return out


def test_same_micro_batches_for_dp1_and_dp2(prefixes, tmp_path):
    cfg = config(prefixes, tmp_path)
    one, two, again = micro_batches(cfg, 1), micro_batches(cfg, 2), micro_batches(cfg, 1)
    assert one.keys() == two.keys() and len(one) == 12
    for k in one:
        assert torch.equal(one[k], two[k]) and torch.equal(one[k], again[k])
    other_seed = micro_batches(DataConfig(**{**cfg.__dict__, "seed": 8}), 1)
    assert any(not torch.equal(one[k], other_seed[k]) for k in one)


def test_resume_mid_epoch(prefixes, tmp_path):
    cfg = config(prefixes, tmp_path)
    full = micro_batches(cfg, 2, consumed=0, steps=5)
    resumed = micro_batches(cfg, 2, consumed=2 * 8, steps=3)
    for (step, k), t in resumed.items():
        assert torch.equal(t, full[(step + 2, k)])


def test_iterator_reports_consumed_samples_and_stops(prefixes, tmp_path):
    it = build_data_iterators(config(prefixes, tmp_path), vocab_size=V, global_batch_size=8,
                              micro_batch_size=4, dp_rank=0, dp_size=1, train_samples=24,
                              valid_samples=8)
    batches = list(it.train)
    assert len(batches) == 6 and it.train.state_dict() == {"consumed_samples": 24}
    assert len(list(it.valid)) == 2 and len(list(it.valid)) == 2  # re-iterable, same each time


def test_batch_fields_and_eod_options(prefixes, tmp_path):
    def first(**kw):
        it = build_data_iterators(config(prefixes[:1], tmp_path, **kw), vocab_size=V,
                                  global_batch_size=4, micro_batch_size=4, dp_rank=0, dp_size=1,
                                  train_samples=16, valid_samples=0)
        assert it.valid is None and it.eod == EOD
        return next(it.train)

    plain = first()
    assert set(plain) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert plain["tokens"].shape == (4, 16) and plain["tokens"].dtype == torch.long
    assert plain["loss_mask"].dtype == torch.float32 and bool((plain["loss_mask"] == 1).all())
    assert torch.equal(plain["tokens"][:, 1:], plain["labels"][:, :-1])
    assert torch.equal(plain["position_ids"][0], torch.arange(16))

    reset = first(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    assert torch.equal(reset["tokens"], plain["tokens"])  # same samples, only masks differ
    mask = reset["attention_mask"]
    assert mask.shape == (4, 1, 16, 16) and mask.dtype == torch.bool
    row = reset["tokens"][0]
    eods = (row == EOD).nonzero().flatten().tolist()
    assert eods, "fixture documents are short: every sample crosses a document end"
    e = eods[0]
    assert reset["loss_mask"][0, e] == 0
    if e + 1 < 16:
        assert reset["position_ids"][0, e + 1] == 0
        assert bool(mask[0, 0, e + 1, e])       # a new document cannot attend to the previous one
    assert not bool(mask[0, 0, e, 0])            # ... but within a document it is causal
    assert bool(mask[0, 0, 0, 1])


def test_refuses_vocab_mismatch_and_corrupt_data(prefixes, tmp_path):
    kw = dict(global_batch_size=4, micro_batch_size=4, dp_rank=0, dp_size=1, train_samples=8,
              valid_samples=0)
    with pytest.raises(ValueError, match="vocab_size is 50"):
        build_data_iterators(config(prefixes, tmp_path), vocab_size=50, **kw)
    bad = str(tmp_path / "trunc")
    write_token_documents(bad, [[1, 2, 3, EOD]] * 20, V)
    with open(bad + ".bin", "r+b") as f:
        f.truncate(30)
    with pytest.raises(DataIntegrityError, match="truncated"):
        build_data_iterators(config([bad], tmp_path), vocab_size=V, **kw)
    with pytest.raises(DataIntegrityError, match="missing"):
        build_data_iterators(config([str(tmp_path / "nothing")], tmp_path), vocab_size=V, **kw)


def test_refuses_tokenizer_mismatch(tmp_path, spm_model, docs):
    from mom_dist.data.preprocess import preprocess
    from tests.data.conftest import write_jsonl

    s = preprocess([write_jsonl(tmp_path / "a.jsonl", docs)], str(tmp_path / "p"), vocab_size=400,
                   valid_ratio=0.0)
    cfg = DataConfig(train_prefixes=[s["outputs"]["train"]], split="1", seq_length=8,
                     tokenizer_model=spm_model)  # a different tokenizer than the data's
    with pytest.raises(ValueError, match="another tokenizer"):
        build_data_iterators(cfg, vocab_size=400, global_batch_size=2, micro_batch_size=2, dp_rank=0,
                             dp_size=1, train_samples=4, valid_samples=0)
    cfg = DataConfig(train_prefixes=[s["outputs"]["train"]], split="1", seq_length=8,
                     tokenizer_model=s["tokenizer"]["model"])
    with pytest.raises(ValueError, match="set the model vocab_size to >= 400"):
        build_data_iterators(cfg, vocab_size=300, global_batch_size=2, micro_batch_size=2, dp_rank=0,
                             dp_size=1, train_samples=4, valid_samples=0)
    it = build_data_iterators(cfg, vocab_size=512, global_batch_size=2, micro_batch_size=2, dp_rank=0,
                              dp_size=1, train_samples=4, valid_samples=0)
    assert int(next(it.train)["tokens"].max()) < 400


def test_config_validation():
    with pytest.raises(ValueError, match="unknown key"):
        DataConfig.from_dict({"train_prefixes": ["x"], "seq_len": 5})
    with pytest.raises(ValueError, match="train_weights"):
        DataConfig(train_prefixes=["a", "b"], train_weights=[1.0])
    with pytest.raises(ValueError, match="split"):
        DataConfig(train_prefixes=["a"], split="a,b")
    with pytest.raises(ValueError, match="without the extension"):
        DataConfig(train_prefixes=["a.bin"])
    with pytest.raises(ValueError, match="train_prefixes"):
        DataConfig(train_prefixes=[])
    with pytest.raises(ValueError, match="set together with valid_prefixes"):  # one validation story
        DataConfig(train_prefixes=["a"], valid_prefixes=["b"], split="90,10,0")
    assert DataConfig(train_prefixes=["a"]).resolved_split() == "969,30,1"
