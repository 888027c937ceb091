"""Config type errors through the real CLIs (issue 15): exit 2, one line naming the field, the
value and what is expected, and nothing written. Before, ``train.steps: 2.5`` trained two steps
and wrote a checkpoint before a traceback; a scalar for a section or YAML that did not parse
ended in a traceback."""

import os
import subprocess
import sys

import pytest

from tests.dist_utils import ROOT
from tests.parallel.test_layout_invariance import BASE

ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)

# (--set overrides, or a YAML text for --config; the message part expected)
CASES = [
    (["train.steps=2.5"], "train.steps=2.5 must be an integer"),
    ("train:\n  steps: 2.5\n", "train.steps=2.5 must be an integer"),
    ("model:\n  d_model: 32\n  attn_router: {kind: gru\n", "is not valid YAML: "),
    ("model:\n  d_model 32\n  n_heads: 2\n", "is not valid YAML: "),
    ("model:\n  attn_router: 5\n", "model.attn_router=5 must be a section"),
    ("train: 300\n", "train=300 is not a section"),  # named while applying --set train.out_dir
    (["train.betas=0.9"], "train.betas=0.9 must be a list of 2 numbers"),
    (["train.betas=[0.9, 0.95, 0.99]"], "train.betas=[0.9, 0.95, 0.99] must be a list of 2 numbers"),
    (["train.betas=[0.9"], "override 'train.betas=[0.9': the value is not valid YAML"),
    (["model.attn_router=5"], "model.attn_router=5 must be a section"),
    (["model.d_model=64.5"], "model.d_model=64.5 must be an integer"),
    (["train.lr=fast"], "train.lr='fast' must be a number"),
    (["train.tensorboard=2"], "train.tensorboard=2 must be true or false"),
    (["parallel.ep_size=1.5"], "parallel.ep_size=1.5 must be an integer"),
    (["data={synthetic: {seed: 0.5}}"], "data.synthetic.seed=0.5 must be an integer"),
    (["data={train_prefixes: [x], seq_length: 16.5}"], "data.seq_length=16.5 must be an integer"),
    (["data=5"], "data=5 must be a section"),
]


@pytest.mark.parametrize("case,message", CASES, ids=[c[1][:40] for c in CASES])
def test_mom_train_refuses_wrong_types_in_one_line_before_writing(tmp_path, case, message):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mom_dist.cli.train"]
    if isinstance(case, str):
        (tmp_path / "c.yaml").write_text(case)
        args += ["--config", str(tmp_path / "c.yaml"), "--set", f"train.out_dir={out}"]
    else:
        args += ["--config", "configs/tiny.yaml"]
        for o in BASE + ["train.steps=3", "train.save_interval=1", f"train.out_dir={out}"] + case:
            args += ["--set", o]
    proc = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mom-train: config error: ") and message in lines[0], lines
    assert not out.exists() and os.listdir(tmp_path) in ([], ["c.yaml"])


def test_mom_plan_refuses_wrong_types(tmp_path, capsys):
    from mom_dist.cli.plan import main

    cluster = os.path.join(ROOT, "configs", "clusters", "h100-1x8.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_steps: [4\n")
    for argv, message in [(["configs/tiny.yaml", "--set", "model.attn_router=5"], "model.attn_router=5 must be a section"),
                          (["configs/tiny.yaml", "--set", "train.global_batch_size=16.5"],
                           "train.global_batch_size=16.5 must be an integer"),
                          ([str(bad)], "is not valid YAML")]:
        argv = [a if not a.startswith("configs/") else os.path.join(ROOT, a) for a in argv]
        assert main(argv + ["--cluster", cluster]) == 2
        err = capsys.readouterr()
        lines = err.err.strip().splitlines()
        assert err.out == "" and len(lines) == 1 and lines[0].startswith("mom-plan: error: ") and message in lines[0]


def test_mom_finetune_and_mom_convert_refuse_wrong_types(tmp_path, capsys):
    from mom_dist.cli.convert import main as convert
    from mom_dist.cli.finetune import main as finetune
    from tests.evaluate import fixtures as fx

    src = fx.exported_model(tmp_path / "src")
    rows = fx.write_jsonl(tmp_path / "rows.jsonl", fx.classification_rows(10, seed=0))
    for ovr, message in [("train.steps=2.5", "train.steps=2.5 must be an integer"),
                         ("train.betas=0.9", "train.betas=0.9 must be a list of 2 numbers"),
                         ("model.dropout=[0.1]", "model.dropout=[0.1] must be a number")]:
        argv = [src, "--task", "sst2", "--train", rows, "--eval", rows, "-o", str(tmp_path / "out"), "--set", ovr]
        assert finetune(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mom-finetune: error: ") and message in lines[0], lines
        assert not (tmp_path / "out").exists()
    argv = ["from-hf", str(tmp_path / "gpt2"), "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
            "--set", "model.attn_router=gru", "-o", str(tmp_path / "conv")]
    assert convert(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model.attn_router='gru' must be a section" in lines[0], lines
    assert not (tmp_path / "conv").exists()
