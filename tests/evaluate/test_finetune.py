"""mom-finetune (issue 10): learning on a separable task, layout invariance of the fine-tuning
losses (one compiled process vs two eager processes with EP2, real gloo), metrics against scikit-learn/scipy
and rouge-score, batched generation against unbatched greedy decoding, and the error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mom_dist.evaluate import finetune as ft
from mom_dist.evaluate.tasks import TaskConfig
from mom_dist.parallel.local_launch import REPO, RankFailure, rank_env, run_ranks
from tests.evaluate import fixtures as fx

WORKERS = os.path.join(REPO, "tests", "evaluate", "finetune_workers.py")
SMALL = ["train.seq_len=24", "train.global_batch_size=8", "train.micro_batch_size=4", "train.lr=3e-3",
         "train.warmup_steps=5", "train.log_interval=1000"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("finetune")


def test_cli_fine_tunes_a_separable_task_well_above_chance(root, tmp_path):
    src = fx.exported_model(root)
    train = fx.write_jsonl(tmp_path / "train.jsonl", fx.classification_rows(400, seed=1))
    dev = fx.write_jsonl(tmp_path / "dev.jsonl", fx.classification_rows(200, seed=2))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mom_dist.cli.finetune", src, "--task", "sst2", "--train", train, "--eval", dev,
           "-o", str(out), "--set", "train.steps=200", *[a for s in SMALL for a in ("--set", s)]]
    env = rank_env(0, 1, 0)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k)  # a plain one-process launch, as a user types it
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "eval_results.json").read_text())
    assert res["n_eval"] == 200 and res["steps"] == 200
    assert res["metrics"]["accuracy"] >= 0.9, res["metrics"]  # chance is 0.5
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 200 and sum(p["prediction"] == p["label"] for p in preds) / 200 == res["metrics"]["accuracy"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["task_loss"] for r in lines if r["kind"] == "finetune"]
    assert train_losses[-1] < 0.5 * train_losses[0]
    assert "mom-finetune: done: accuracy" in proc.stdout
    assert "built successfully" not in proc.stdout  # DeepSpeed's op-load print is filtered, as in mom-train
    # the fine-tuned model is an exported directory with its tokenizer and its head ...
    import filecmp

    assert filecmp.cmp(out / "model" / "tokenizer.model", os.path.join(src, "tokenizer.model"), shallow=False)
    ours = ft.load_task_model(str(out / "model"))
    assert ours.cfg.d_model == fx.MODEL["d_model"] and ours.kind == "classification"
    # ... and to-hf makes it a transformers classifier with the same logits (right-padded batch)
    from transformers import AutoModelForSequenceClassification

    from mom_dist.cli.convert import main as convert_main
    assert convert_main(["to-hf", str(out / "model"), "-o", str(tmp_path / "hf")]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    assert hf.config.num_labels == 2 and hf.config.problem_type == "single_label_classification"
    task = TaskConfig.build("sst2", train_file=train, eval_file=dev)
    examples = ft.prepare(src, task, str(tmp_path / "again"), SMALL).eval[:16]  # encoded as the run did
    batch = ft.collate(examples, task, max(len(e.ids) for e in examples), pad=0)
    mask = (torch.arange(batch["tokens_BS"].shape[1])[None] <= batch["last_B"][:, None]).long()
    with torch.no_grad():
        want = ours(**batch).scores
        got = hf(input_ids=batch["tokens_BS"], attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.argmax(-1).tolist() == [p["prediction"] for p in preds[:16]]


def _runs(root, tmp_path, layout: str, overrides: list) -> list[dict]:
    cls_train = fx.write_jsonl(tmp_path / "pairs.jsonl", fx.pair_rows(40, seed=3))
    cls_dev = fx.write_jsonl(tmp_path / "pairs_dev.jsonl", fx.pair_rows(12, seed=4))
    sum_train = fx.write_jsonl(tmp_path / "sum.jsonl", fx.summary_rows(40, seed=5))
    sum_dev = fx.write_jsonl(tmp_path / "sum_dev.jsonl", fx.summary_rows(6, seed=6))
    common = SMALL + ["train.steps=4", "train.grad_clip=0.05", "model.dropout=0.0"] + overrides
    return [dict(name="mrpc", preset="mrpc", task=dict(train_file=cls_train, eval_file=cls_dev),
                 out=str(tmp_path / f"mrpc_{layout}"), overrides=common),
            dict(name="xsum", preset="xsum", task=dict(train_file=sum_train, eval_file=sum_dev, max_target_len=4,
                                                       max_new_tokens=4, eval_batch_size=4),
                 out=str(tmp_path / f"xsum_{layout}"), overrides=common)]


def test_fine_tuning_losses_do_not_depend_on_the_layout_or_compile(root, tmp_path):
    src = fx.exported_model(root)
    # The one-process runs train through torch.compile (train.compile; aot_eager: the same
    # graphs as inductor without generating kernels), the EP2 runs eagerly.
    compiled = ["train.compile=on", "train.compile_backend=aot_eager"]
    one = run_ranks(WORKERS, "finetune_runs", 1, dict(source=src, runs=_runs(root, tmp_path, "w1", compiled)),
                    tmp_path)[0]
    ep2 = run_ranks(WORKERS, "finetune_runs", 2,
                    dict(source=src, runs=_runs(root, tmp_path, "ep2", ["parallel.ep_size=2", "parallel.zero_stage=2"])),
                    tmp_path)
    assert ep2[0] == ep2[1]  # every rank reports the same numbers
    for name in ("mrpc", "xsum"):
        a, b = one[name]["train_losses"], ep2[0][name]["train_losses"]
        assert len(a) == len(b) == 4
        rel = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        assert rel <= 1e-5, (name, a, b)
        assert a[-1] != a[0]  # it trained
        assert one[name]["predictions"] == ep2[0][name]["predictions"]
        assert one[name]["compile"]["graphs"] == 1 and one[name]["compile"]["graph_breaks"] == 0, one[name]["compile"]
        assert ep2[0][name]["compile"]["graphs"] == 0
        for k, v in one[name]["metrics"].items():
            assert ep2[0][name]["metrics"][k] == pytest.approx(v, abs=1e-9)
    assert set(one["xsum"]["metrics"]) == {"rouge1", "rouge2", "rougeL"}
    assert set(one["mrpc"]["metrics"]) == {"accuracy", "f1"}


def test_metrics_match_scikit_learn_scipy_and_rouge_score():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    from mom_dist.evaluate import tasks as T

    g = torch.Generator().manual_seed(0)
    for n_classes in (2, 3):
        gold = torch.randint(0, n_classes, (200,), generator=g).tolist()
        pred = [x if torch.rand(1, generator=g).item() < 0.7 else (x + 1) % n_classes for x in gold]
        assert T.accuracy(pred, gold) == pytest.approx(sklearn_metrics.accuracy_score(gold, pred))
        assert T.matthews_correlation(pred, gold) == pytest.approx(sklearn_metrics.matthews_corrcoef(gold, pred))
        if n_classes == 2:
            assert T.f1(pred, gold) == pytest.approx(sklearn_metrics.f1_score(gold, pred))
    x = torch.randn(100, generator=g)
    y = (x + 0.5 * torch.randn(100, generator=g)).round(decimals=1)  # ties in the ranks
    assert T.pearson(x.tolist(), y.tolist()) == pytest.approx(stats.pearsonr(x.numpy(), y.numpy())[0])
    assert T.spearmanr(x.tolist(), y.tolist()) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy())[0])
    from rouge_score import rouge_scorer

    preds, refs = ["the cat sat on mats", "dogs running fast"], ["the cat sat on the mat", "a dog runs fast"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    want = {t: sum(scorer.score(r, p)[t].fmeasure for p, r in zip(preds, refs)) / 2 for t in ("rouge1", "rouge2", "rougeL")}
    assert T.rouge(preds, refs) == pytest.approx(want)
    assert T.rouge(["dog runs"], ["dogs running"])["rouge1"] == 1.0  # stemmed, as XSUM papers score


def test_batched_generation_equals_greedy_decoding_of_each_prompt():
    from mom_dist.evaluate.generate import greedy_batch
    from mom_dist.model import ModelConfig, MoMModel, RouterConfig
    from mom_dist.model.generate import generate_greedy

    r = RouterConfig(kind="gru", dim=8, top_k=2, temperature=1.0)
    model = MoMModel(ModelConfig(vocab_size=30, max_seq_len=32, d_model=16, n_heads=2, n_bottom=1, n_top=1,
                                 n_attn_modules=2, n_ffn_modules=3, n_steps=2, anchor=True, attn_router=r,
                                 ffn_router=r)).eval()
    prompts = [torch.randint(1, 30, (n,)).tolist() for n in (3, 7, 5, 1)]
    eod = 0
    got = greedy_batch(model, prompts, 8, eod)
    for p, g in zip(prompts, got):
        full = generate_greedy(model, torch.tensor([p]), 8)[0, len(p):].tolist()
        want = full[:full.index(eod)] if eod in full else full
        assert g == want


@pytest.mark.parametrize("case,message", [
    ("unknown preset", "unknown task preset 'sst3'"),
    ("missing field", "has no field 'sentence' (its fields: text, label)"),
    ("bad file", "cannot read training file"),
    ("missing file", "does not exist"),
    ("unknown format", "unknown format '.txt'"),
    ("string label", "is not a class id in [0, 2)"),
    ("bad source", "is not a directory"),
    ("wrong tokenizer", "not the model's tokenizer"),
    ("another model's tokenizer", "their vocabularies differ"),
    ("architecture override", "not the architecture"),
])
def test_input_errors_are_one_line_and_exit_2(root, tmp_path, capsys, case, message):
    from mom_dist.cli.finetune import main

    src = fx.exported_model(root)
    good = fx.write_jsonl(tmp_path / "good.jsonl", fx.classification_rows(10, seed=0))
    argv = [src, "--task", "sst2", "--train", good, "--eval", good, "-o", str(tmp_path / "out")]
    if case == "unknown preset":
        argv[2] = "sst3"
    elif case == "missing field":
        argv[4] = fx.write_jsonl(tmp_path / "other.jsonl", [{"text": "a b", "label": 1}])
    elif case == "bad file":
        (tmp_path / "bad.json").write_text('{"sentence": "a", "label": 1}\n{not json')
        argv[4] = str(tmp_path / "bad.json")
    elif case == "missing file":
        argv[4] = str(tmp_path / "nowhere.jsonl")
    elif case == "unknown format":
        (tmp_path / "data.txt").write_text("a b c\n")
        argv[4] = str(tmp_path / "data.txt")
    elif case == "string label":
        argv[6] = fx.write_jsonl(tmp_path / "dev.jsonl", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 7}])
    elif case == "bad source":
        argv[0] = str(tmp_path / "no_model")
    elif case == "wrong tokenizer":
        argv[0] = fx.exported_model(root, "small_vocab", vocab_size=300)
    elif case == "another model's tokenizer":
        argv += ["--tokenizer", fx.other_tokenizer(root)]
    elif case == "architecture override":
        argv += ["--set", "model.d_model=64"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mom-finetune: error: "), err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_never_overwritten(root, tmp_path, capsys):
    from mom_dist.cli.finetune import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_results.json").write_text("earlier results")
    good = fx.write_jsonl(tmp_path / "good.jsonl", fx.classification_rows(10, seed=0))
    assert main([fx.exported_model(root), "--task", "sst2", "--train", good, "--eval", good, "-o", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "eval_results.json").read_text() == "earlier results"


def _task_model(kind, num_labels=3):
    from mom_dist.evaluate.finetune import TaskModel
    from mom_dist.model import ModelConfig, MoMModel, RouterConfig

    r = RouterConfig(kind="gru", dim=8, top_k=2, temperature=0.5)
    mom = MoMModel(ModelConfig(vocab_size=40, max_seq_len=16, d_model=16, n_heads=2, n_attn_modules=2,
                               n_ffn_modules=3, n_steps=2, attn_router=r, ffn_router=r, balance_coef=0.3,
                               z_loss_coef=0.2))
    return TaskModel(mom, kind, num_labels)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_task_loss_keeps_balance_and_z_losses_and_ignores_padding(kind):
    from mom_dist.evaluate.finetune import collate
    from mom_dist.evaluate.tasks import Example, TaskConfig

    model = _task_model(kind, 3 if kind == "classification" else 1).eval()
    task = TaskConfig(kind=kind, train_file="x", eval_file="y", text_fields=["a"], num_labels=3)
    task.validate()
    g = torch.Generator().manual_seed(1)
    examples = [Example(torch.randint(2, 40, (n,), generator=g).tolist(),
                        label=(i % 3) if kind == "classification" else 0.5 * i) for i, n in enumerate((5, 9, 3))]
    batch = collate(examples, task, 12, pad=1)
    out = model(**batch)
    # by hand: the score of each sequence's last real token, then the model's router losses
    hidden = model.mom(batch["tokens_BS"], hidden_only=True)
    pooled = hidden.hidden[torch.arange(3), torch.tensor([4, 8, 2])]
    scores = pooled @ model.score.weight.T
    if kind == "classification":
        task_loss = torch.nn.functional.cross_entropy(scores, batch["labels"])
    else:
        task_loss = torch.nn.functional.mse_loss(scores.squeeze(-1), batch["labels"])
    bal, z = model.mom.router_losses(hidden.routing)
    torch.testing.assert_close(out.loss, task_loss + 0.3 * bal + 0.2 * z)
    assert float(bal.detach()) > 0 and float(z.detach()) > 0
    # right padding never reaches the scored token (causal attention): each example alone scores the same
    for i, ex in enumerate(examples):
        alone = model(**collate([ex], task, len(ex.ids), pad=1)).scores
        torch.testing.assert_close(alone[0], out.scores[i], rtol=1e-5, atol=1e-6)


def test_tokenizer_must_be_the_models_own(root, tmp_path):
    """--tokenizer may name the model's tokenizer (any file name), never another one: the model
    would read ids it never learned."""
    import shutil

    from mom_dist.evaluate import finetune as ft
    from mom_dist.evaluate.tasks import TaskConfig

    src = fx.exported_model(root)
    good = fx.write_jsonl(tmp_path / "good.jsonl", fx.classification_rows(10, seed=0))
    task = TaskConfig.build("sst2", train_file=good, eval_file=good)
    other = fx.other_tokenizer(root)
    with pytest.raises(ValueError, match="is not the tokenizer .* was trained with .*re-tokenize the data"):
        ft.prepare(src, task, str(tmp_path / "out"), tokenizer=other)
    assert not (tmp_path / "out").exists()
    renamed = shutil.copy(os.path.join(src, "tokenizer.model"), tmp_path / "renamed.model")
    prepared = ft.prepare(src, task, str(tmp_path / "out"), tokenizer=str(renamed))
    assert prepared.tokenizer_path == os.path.join(src, "tokenizer.model")
    bare = fx.exported_model(root, "bare_model")
    os.remove(os.path.join(bare, "tokenizer.model"))  # records none: --tokenizer names it
    with pytest.raises(ValueError, match=f"no tokenizer is recorded for '{bare}'; pass --tokenizer"):
        ft.prepare(bare, task, str(tmp_path / "out"))
    assert ft.prepare(bare, task, str(tmp_path / "out"), tokenizer=other).tokenizer_path == other
