"""A run started with relative data and tokenizer paths, read by the tools from another directory.

The run records the directory it was started in, so `mom-convert export`, `mom-convert to-hf`,
`mom-eval` and `mom-finetune` find its tokenizer from anywhere, and `mom-prune` its validation data. A run saved before that was
recorded (simulated by deleting it) resolves against the current directory; when that fails,
export and to-hf stop naming the paths they tried (export never silently drops the tokenizer),
and `--no-tokenizer` exports the weights alone."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess

import pytest

from tests.dist_utils import ROOT
from tests.export.test_hf_export import tiny_tokenizer
from tests.launch.launch_utils import BIN, clean_env

MODEL = ["model.vocab_size=400", "model.max_seq_len=16", "model.d_model=32", "model.n_heads=2", "model.n_steps=2",
         "model.attn_router.dim=16", "model.ffn_router.dim=16"]
TRAIN = ["train.seq_len=8", "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=2",
         "train.eval_batches=1", "train.log_interval=1", "train.save_interval=2", "train.tensorboard=false",
         "train.out_dir=run", "parallel.ep_size=1"]


@pytest.fixture(scope="module")
def started_elsewhere(tmp_path_factory):
    """``a/run``: trained in ``a`` with data/tokenizer paths relative to ``a``; ``b``: another directory."""
    from pydoc_data.topics import topics

    from mom_dist.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("paths")
    a, b = root / "a", root / "b"
    (a / "data").mkdir(parents=True)
    b.mkdir()
    tok = tiny_tokenizer(str(a / "data"))
    corpus = a / "corpus.jsonl"
    with open(corpus, "w") as f:
        for k in sorted(topics)[45:75]:
            f.write(json.dumps({"text": topics[k][:600]}) + "\n")
    preprocess([str(corpus)], str(a / "data" / "mine"), tokenizer_model=tok, workers=1, valid_ratio=0.2)
    data = ["data.train_prefixes=[data/mine_train_text_document]", "data.valid_prefixes=[data/mine_valid_text_document]",
            "data.tokenizer_model=data/tok.model"]
    args = ["--config", os.path.join(ROOT, "configs", "tiny.yaml")]
    for item in MODEL + TRAIN + data:
        args += ["--set", item]
    env = clean_env()
    env.pop("MASTER_PORT", None)
    p = subprocess.run([os.path.join(BIN, "mom-train"), *args], cwd=str(a), env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return {"a": a, "b": b, "tok": tok, "run": os.path.join("..", "a", "run")}


def tool(cwd, *argv):
    return subprocess.run([os.path.join(BIN, argv[0]), *argv[1:]], cwd=str(cwd), env=clean_env(),
                          capture_output=True, text=True, timeout=300)


def test_tools_find_the_tokenizer_of_a_run_started_elsewhere(started_elsewhere, monkeypatch, tmp_path):
    w = started_elsewhere
    b = w["b"]
    p = tool(b, "mom-convert", "export", w["run"], "-o", "exported")
    assert p.returncode == 0, p.stderr[-3000:]
    assert filecmp.cmp(b / "exported" / "tokenizer.model", w["tok"], shallow=False)
    p = tool(b, "mom-convert", "to-hf", w["run"], "-o", "hf")
    assert p.returncode == 0, p.stderr[-3000:]
    assert filecmp.cmp(b / "hf" / "tokenizer.model", w["tok"], shallow=False)
    p = tool(b, "mom-eval", w["run"], "--data", "../a/data/mine_valid_text_document", "--seq-len", "8",
             "--no-progress")
    assert p.returncode == 0 and json.loads(p.stdout)["tokens"] > 0, p.stderr[-3000:]
    # mom-finetune's input checks (the tokenizer it encodes the task with)
    from mom_dist.evaluate import finetune as ft
    from mom_dist.evaluate.tasks import TaskConfig
    from tests.evaluate import fixtures as fx

    rows = fx.write_jsonl(tmp_path / "rows.jsonl", fx.classification_rows(8, seed=0))
    monkeypatch.chdir(b)
    prepared = ft.prepare(w["run"], TaskConfig.build("sst2", train_file=rows, eval_file=rows), str(tmp_path / "ft"),
                          ["train.seq_len=16"])
    assert os.path.samefile(prepared.tokenizer_path, w["tok"])


def test_mom_prune_measures_on_the_runs_own_validation_data_from_elsewhere(started_elsewhere):
    w = started_elsewhere
    p = tool(w["b"], "mom-prune", w["run"], "-o", "pruned", "--attn-keep", "0.5", "--ffn-keep", "0.5",
             "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    table = json.loads((w["b"] / "pruned" / "prune_table.json").read_text())
    assert table["data"] == str(w["a"] / "data" / "mine_valid_text_document") and table["tokens"] > 0
    assert filecmp.cmp(w["b"] / "pruned" / "tokenizer.model", w["tok"], shallow=False)


def test_a_run_without_its_recorded_directory_says_what_was_looked_for(started_elsewhere, tmp_path):
    w = started_elsewhere
    old = tmp_path / "old_run"
    subprocess.run(["cp", "-r", str(w["a"] / "run"), str(old)], check=True)
    from mom_dist.checkpoint.layout import read_state, write_state

    step = old / "checkpoints" / "step00000002"
    state = read_state(str(step))
    assert state["config"].pop("workdir") == str(w["a"])  # what the trainer recorded
    write_state(str(step), state)  # as a run saved before workdir was recorded (its checksum renewed)
    for argv in (["export", str(old), "-o", "x"], ["to-hf", str(old), "-o", "x"]):
        p = tool(w["b"], "mom-convert", *argv)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-3000:]
        assert f"the tokenizer recorded for '{old}' was not found (looked for {w['b']}/data/tok.model" in p.stderr
        assert "--no-tokenizer" in p.stderr and not (w["b"] / "x").exists()
    p = tool(w["b"], "mom-convert", "export", str(old), "-o", "x", "--no-tokenizer")
    assert p.returncode == 0 and not (w["b"] / "x" / "tokenizer.model").exists(), p.stderr[-3000:]
    p = tool(w["a"], "mom-convert", "export", str(old), "-o", str(tmp_path / "y"))  # from where it was started
    assert p.returncode == 0 and (tmp_path / "y" / "tokenizer.model").exists(), p.stderr[-3000:]
