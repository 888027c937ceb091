"""The self-contained transformers export (``mom-convert to-hf``) against mom_dist itself.

The exported code is run in a subprocess where ``mom_dist`` cannot be imported (hf_check.py);
``test_clean_venv.py`` runs the same script in a venv that never had mom_dist. Compared with our
``MoMModel``: logits (1e-5), LM/balance/z losses, greedy ``generate`` = ``generate_greedy``,
beam search and sampling with the per-routing-step cache = without it, left/right padding =
unpadded, ``position_ids``, sequence classification batched = row by row, ``AutoTokenizer`` ids
= our SentencePiece ids.
"""

import ast
import json
import os
import subprocess
import sys

import pytest
import torch

from mom_dist.checkpoint.sources import load_source
from mom_dist.convert.hf import HF_REMOTE, export_hf
from mom_dist.model import MoMModel
from mom_dist.model.config import ModelConfig, RouterConfig, gpt2_config
from mom_dist.model.generate import generate_greedy

HERE = os.path.dirname(os.path.abspath(__file__))
TEXTS = ["Hello world 12345\n  two  spaces\tand a tab, café naïve 日本 ✓ x<y",
         "The quick brown fox jumps over the lazy dog.", "", "a\n\nb  \n"]


def tiny_tokenizer(directory) -> str:
    from pydoc_data.topics import topics

    from mom_dist.data.tokenizer import train_tokenizer

    return train_tokenizer([topics[k] for k in sorted(topics)[:40]], os.path.join(directory, "tok"), vocab_size=400)


def two_tokenizer_data(d, topic_range: slice, chars: int, valid_ratio: float) -> tuple[str, str]:
    """``tiny_tokenizer`` and another one, and the same pydoc topics preprocessed with each into
    ``d/mine_*`` and ``d/theirs_*``: (the first tokenizer, the other)."""
    import json

    from pydoc_data.topics import topics

    from mom_dist.data.preprocess import preprocess
    from mom_dist.data.tokenizer import train_tokenizer

    tok = tiny_tokenizer(str(d))
    other = train_tokenizer([topics[k] for k in sorted(topics)[-40:]], str(d / "other"), vocab_size=380)
    corpus = d / "corpus.jsonl"
    with open(corpus, "w") as f:
        for k in sorted(topics)[topic_range]:
            f.write(json.dumps({"text": topics[k][:chars]}) + "\n")
    preprocess([str(corpus)], str(d / "mine"), tokenizer_model=tok, workers=1, valid_ratio=valid_ratio)
    preprocess([str(corpus)], str(d / "theirs"), tokenizer_model=other, workers=1, valid_ratio=valid_ratio)
    return tok, other


def routed_config(vocab_size: int, **overrides) -> ModelConfig:
    """Exercises every path of the forward: two chunks with anchors, top-2 GRU attention routing
    with SKIP and masked SKIP keys, weighted QKV, an MLP FFN router, bottom and top blocks."""
    kw = dict(vocab_size=vocab_size, max_seq_len=48, d_model=16, n_heads=2, n_bottom=1, n_top=1, n_chunks=2,
              n_attn_modules=2, n_ffn_modules=3, n_steps=3, anchor=True, mask_skip_keys=True, qkv_weighted=True,
              attn_router=RouterConfig(dim=8, top_k=2, temperature=1.0),
              ffn_router=RouterConfig(kind="mlp", dim=8, top_k=2, temperature=1.0), z_loss_coef=0.01)
    kw.update(overrides)
    return ModelConfig(**kw)


def make_inputs(vocab_size: int, texts) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab_size, (3, 20), generator=g)
    return {"ids": ids, "prompt": ids[:, :6], "new_tokens": 8, "texts": texts,
            "position_ids": torch.arange(3, 23).expand(3, 20),
            "ragged": [torch.randint(2, vocab_size, (n,), generator=g).tolist() for n in (12, 7, 3)]}


def run_check(python, hf_dir, inputs, tmp_path, env=None) -> dict:
    torch.save(inputs, tmp_path / "inputs.pt")
    proc = subprocess.run([python, os.path.join(HERE, "hf_check.py"), hf_dir, str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "outputs.pt")


def without_mom_dist_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


@torch.no_grad()
def assert_matches_ours(model: MoMModel, res: dict, x: dict, tokenizer: str | None) -> None:
    assert not res["mom_dist_importable"]
    cfg = model.cfg
    assert res["config"]["max_position_embeddings"] == cfg.max_seq_len
    assert res["config"]["num_hidden_layers"] == cfg.depth
    assert res["generation_config"] == {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}
    ids = x["ids"]
    assert (res["logits"] - model(ids).logits).abs().max().item() <= 1e-5
    ours = model(ids, ids)  # router losses over the whole input, as the transformers loss has them
    lm = model(ids[:, :-1], ids[:, 1:]).lm_loss.item()
    got = res["losses"]
    assert got["lm_loss"] == pytest.approx(lm, abs=1e-5)
    assert got["balance_loss"] == pytest.approx(ours.balance_loss.item(), abs=1e-5)
    assert got["z_loss"] == pytest.approx(ours.z_loss.item(), abs=1e-5)
    want = lm + cfg.balance_coef * ours.balance_loss.item() + cfg.z_loss_coef * ours.z_loss.item()
    assert got["loss"] == pytest.approx(want, abs=1e-5) and got["loss"] > lm  # router losses not dropped
    assert (res["position_logits"] - model(ids, position_ids_BS=x["position_ids"]).logits).abs().max() <= 1e-5

    assert torch.equal(res["greedy"], generate_greedy(model, x["prompt"], x["new_tokens"]))
    assert torch.equal(res["greedy_nocache"], res["greedy"])
    assert torch.equal(res["beam"], res["beam_nocache"])
    assert torch.equal(res["sample"], res["sample_nocache"])
    assert not torch.equal(res["sample"], res["greedy"])

    n = max(len(s) for s in x["ragged"])
    for i, s in enumerate(x["ragged"]):
        alone = model(torch.tensor([s])).logits[0]
        assert (res["left_logits"][i, n - len(s):] - alone).abs().max() <= 1e-5
        assert (res["right_logits"][i, :len(s)] - alone).abs().max() <= 1e-5
        assert torch.equal(res["left_generate"][i, n:],
                           generate_greedy(model, torch.tensor([s]), x["new_tokens"])[0, len(s):])
    assert (res["cls_right"] - res["cls_rows"]).abs().max() <= 1e-5
    assert (res["cls_left"] - res["cls_rows"]).abs().max() <= 1e-5
    assert res["cls_loss"] > 0

    if tokenizer is not None:
        from mom_dist.data.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer)
        assert res["tok_ids"] == [tok.encode(t) for t in x["texts"]]
        assert res["tok_decoded"] == list(x["texts"])
        assert res["resaved_tok_ids"] == res["tok_ids"]
        assert torch.equal(res["resaved_logits"], res["logits"])
        assert res["tok_special"] == {"bos_token_id": tok.eod, "eos_token_id": tok.eod, "pad_token_id": 0,
                                      "unk_token_id": 0, "model_max_length": cfg.max_seq_len}
        ids_b, mask_b = res["tok_batch"]
        assert ids_b.shape[0] == 2 and mask_b[1].sum() == len(tok.encode(x["texts"][1]))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def routed(tokenizer):
    torch.manual_seed(0)
    return MoMModel(routed_config(400)).eval()


def test_exported_code_imports_only_torch_transformers_sentencepiece():
    allowed = {"torch", "transformers", "sentencepiece", "os", "shutil", "copy", "dataclasses"}
    for name in ("configuration_mom.py", "modeling_mom.py", "tokenization_mom.py"):
        with open(os.path.join(HF_REMOTE, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                tops = set() if node.level else {node.module.split(".")[0]}
            else:
                continue
            assert tops <= allowed, f"{name} imports {tops - allowed}"


def test_config_defaults_mirror_model_config():
    import dataclasses

    from mom_dist.convert.hf_remote.configuration_mom import MOM_DEFAULTS, MoMConfig

    ours = dataclasses.asdict(ModelConfig())
    pending = {"router_bias", "balance_reduction"}  # issue 10 (router/loss options) adds them to ModelConfig
    assert set(MOM_DEFAULTS) - set(ours) <= pending and set(ours) <= set(MOM_DEFAULTS)
    assert {k: MOM_DEFAULTS[k] for k in ours} == ours
    with pytest.raises(ValueError, match="unknown field"):
        MoMConfig(mom={"d_modle": 8})
    with pytest.raises(ValueError, match="balance_mode"):
        MoMConfig(mom={"balance_mode": "sum"})


def test_routed_export_runs_without_mom_dist_and_matches_ours(routed, tokenizer, tmp_path):
    hf_dir = export_hf(routed, str(tmp_path / "hf"), tokenizer=tokenizer)
    assert sorted(os.listdir(hf_dir)) == sorted([
        "config.json", "configuration_mom.py", "generation_config.json", "model.safetensors", "modeling_mom.py",
        "tokenization_mom.py", "tokenizer.model", "tokenizer_config.json"])
    x = make_inputs(400, TEXTS)
    res = run_check(sys.executable, hf_dir, x, tmp_path, env=without_mom_dist_env())
    assert_matches_ours(routed, res, x, tokenizer)
    # and mom_dist reads the directory back exactly (mom-eval, mom-finetune)
    back, tok = load_source(hf_dir)
    assert tok == os.path.join(hf_dir, "tokenizer.model")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), routed.state_dict().values()))


def test_trainer_keeps_router_losses(routed, tokenizer, tmp_path):
    """transformers' Trainer takes ``outputs.loss``: it must carry the balance and z terms, and
    they must reach the routers (renorm weighting with K=1 gives routers no LM gradient)."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    cfg = routed_config(400, attn_router=RouterConfig(dim=8, top_k=1, weighting="renorm"),
                        ffn_router=RouterConfig(dim=8, top_k=1, weighting="renorm"), balance_coef=0.5)
    torch.manual_seed(0)
    hf_dir = export_hf(MoMModel(cfg), str(tmp_path / "hf"), tokenizer=tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)
    trainer = Trainer(model=hf, args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[],
                                                       use_cpu=True))
    ids = make_inputs(400, [])["ids"]
    loss = trainer.compute_loss(hf, {"input_ids": ids, "labels": ids})
    out = hf(ids, labels=ids)
    assert loss.item() == pytest.approx(out.lm_loss.item() + 0.5 * out.balance_loss.item()
                                        + cfg.z_loss_coef * out.z_loss.item(), abs=1e-6)
    loss.backward()
    head = hf.model.chunks[0].attn_router.head.weight.grad
    assert head is not None and head.abs().max() > 0


def test_vanilla_export_is_stock_gpt2_with_our_special_ids(tokenizer, tmp_path):
    from transformers import AutoTokenizer, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(0)
    vanilla = MoMModel(gpt2_config(16, 2, 3, vocab_size=400, max_seq_len=48)).eval()
    hf_dir = export_hf(vanilla, str(tmp_path / "gpt2"), tokenizer=tokenizer)
    with open(os.path.join(hf_dir, "generation_config.json")) as f:
        assert {k: v for k, v in json.load(f).items() if k.endswith("token_id")} == \
            {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}
    lm = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    assert (lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id) == (1, 1, 0)
    tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    texts = ["The quick brown fox.", "A longer sentence: the lazy dog sleeps."]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert (lm(batch["input_ids"]).logits - vanilla(batch["input_ids"]).logits).abs().max() <= 1e-5
        cls = GPT2ForSequenceClassification.from_pretrained(hf_dir, num_labels=2).eval()
        both = cls(**batch).logits  # batch > 1 needs a pad token
        rows = torch.cat([cls(**tok(t, return_tensors="pt")).logits for t in texts])
    assert (both - rows).abs().max() <= 1e-5
    back, _ = load_source(hf_dir)  # a GPT-2 directory reads back as a vanilla MoM
    with torch.no_grad():
        assert (back(batch["input_ids"]).logits - vanilla(batch["input_ids"]).logits).abs().max() <= 1e-5


@pytest.mark.skipif(not hasattr(ModelConfig(), "router_bias"),
                    reason="ModelConfig has no router_bias/balance_reduction yet (they arrive with issue 10's "
                           "router/loss options)")
@pytest.mark.parametrize("mode", ["pooled", "depthwise"])
def test_release_options_match_ours(tmp_path, mode):
    """router_bias (GRU head_bias, made non-zero here) and balance_reduction=release."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = MoMModel(routed_config(400, router_bias=True, balance_reduction="release", balance_mode=mode,
                                   balance_double_softmax=True)).eval()
    with torch.no_grad():
        for chunk in model.chunks:
            chunk.attn_router.head_bias.normal_(0.0, 1.0)
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, str(tmp_path / "hf")), trust_remote_code=True).eval()
    ids = make_inputs(400, [])["ids"]
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() <= 1e-5
        out, ours = hf(ids, labels=ids), model(ids, ids)
    assert out.balance_loss.item() == pytest.approx(ours.balance_loss.item(), abs=1e-5)
    assert out.z_loss.item() == pytest.approx(ours.z_loss.item(), abs=1e-5)


@pytest.mark.parametrize("kind", ["routed", "vanilla"])
def test_fine_tuned_head_goes_to_a_transformers_classifier(kind, tmp_path, capsys):
    """An exported directory with a task head (what mom-finetune writes in OUT_DIR/model): to-hf
    writes MoMForSequenceClassification (stock GPT2ForSequenceClassification for the vanilla
    case) whose logits equal our TaskModel's on a right-padded batch, with the label names."""
    from transformers import AutoModelForSequenceClassification

    from mom_dist.cli.convert import main as convert_main
    from mom_dist.checkpoint.exported import save_exported
    from mom_dist.convert.task_head import TaskHead, save_task_head
    from mom_dist.evaluate.finetune import TaskModel, load_task_model

    torch.manual_seed(0)
    cfg = routed_config(64, dropout=0.0) if kind == "routed" else gpt2_config(16, 2, 3, vocab_size=64, max_seq_len=48)
    ours = TaskModel(MoMModel(cfg), "classification", 3).eval()
    src = save_exported(str(tmp_path / "model"), cfg, ours.mom.state_dict())
    save_task_head(src, TaskHead(ours.score.weight, "classification", ["neg", "neutral", "pos"]))
    assert torch.equal(load_task_model(src).score.weight, ours.score.weight)
    assert convert_main(["to-hf", src, "-o", str(tmp_path / "hf"), "--no-tokenizer"]) == 0, capsys.readouterr().err
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    want_class = "MoMForSequenceClassification" if kind == "routed" else "GPT2ForSequenceClassification"
    assert type(hf).__name__ == want_class
    assert hf.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    lengths = torch.tensor([9, 4, 12])
    ids = torch.randint(2, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    ids[torch.arange(12)[None] >= lengths[:, None]] = 0  # right padding with the pad id
    mask = (ids != 0).long()
    with torch.no_grad():
        want = ours(ids, torch.zeros(3, dtype=torch.long), last_B=lengths - 1).scores
        got = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
