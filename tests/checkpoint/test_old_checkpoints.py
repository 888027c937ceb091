"""Checkpoints written by earlier code still load.

- ``tests/fixtures/pre_move_checkpoint/run``: written by the trainer before the format moved into
  ``mom_dist/checkpoint`` (2 ranks, EP2, ZeRO-1). It resumes in one process with the losses that
  code got, and exports / initialises a run / loads for evaluation with the weights that code
  read from it (``expected.json``; how it was made: the folder's README.md).
- DeepSpeed's own format (mom_dist before the layout-free format): written here by DeepSpeed's
  ``save_checkpoint``, as that code did. It resumes on its own layout exactly, and exports and
  initialises runs with the weights it was saved with.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mom_dist.checkpoint.consolidate import consolidate
from mom_dist.checkpoint.sources import init_from_source, load_source
from mom_dist.config import load_config
from mom_dist.model import MoMModel
from tests.dist_utils import ROOT, run_workers
from tests.parallel.test_layout_invariance import BASE, CASES, params

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "pre_move_checkpoint")
with open(os.path.join(FIXTURE, "expected.json")) as _f:
    EXPECTED = json.load(_f)
ENV = dict(os.environ, PYTHONPATH=ROOT)


def digests(state_dict: dict) -> dict:
    return {k: hashlib.sha256(v.detach().float().contiguous().numpy().tobytes()).hexdigest()
            for k, v in sorted(state_dict.items())}


def fixture_run(tmp_path):
    """A copy of the fixture's run directory (a resume writes into it)."""
    run = tmp_path / "run"
    shutil.copytree(os.path.join(FIXTURE, "run"), run)
    return run


def test_pre_move_checkpoint_resumes_with_the_losses_it_gave_before(tmp_path):
    run = fixture_run(tmp_path)
    overrides = EXPECTED["overrides"] + EXPECTED["resumed_with"] + [f"train.out_dir={run}"]
    res = run_workers("train_once", 1, dict(config="configs/tiny.yaml", overrides=overrides), tmp_path)[0]
    assert res["steps_done"] == 4
    assert res["losses"] == pytest.approx(EXPECTED["resumed_losses"], rel=1e-5)
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step00000002", "step00000004"]


def test_pre_move_checkpoint_exports_the_weights_it_held(tmp_path):
    run = fixture_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mom_dist.cli.convert", "export", str(run), "-o",
                           str(tmp_path / "export")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file
    assert digests(load_file(str(tmp_path / "export" / "model.safetensors"))) == EXPECTED["weights_sha256"]


def test_pre_move_checkpoint_starts_runs_and_evaluations_with_its_weights(tmp_path):
    run = os.path.join(FIXTURE, "run")  # read only
    cfg, sd, state = consolidate(run)
    assert state["step"] == 2 and digests(sd) == EXPECTED["weights_sha256"]
    model = MoMModel(load_config("configs/tiny.yaml", EXPECTED["overrides"]).model)
    init_from_source(model, run)  # train.init_from
    assert digests(model.state_dict()) == EXPECTED["weights_sha256"]
    loaded, tokenizer = load_source(run)  # mom-eval, mom-convert to-hf
    assert digests(loaded.state_dict()) == EXPECTED["weights_sha256"] and tokenizer is None


LEGACY = [o for o in BASE if not o.startswith("train.steps")] + CASES["k2"] + [
    "parallel.ep_size=2", "parallel.zero_stage=1"]


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("legacy")
    result = run_workers("legacy_format", 2, dict(config="configs/tiny.yaml", overrides=LEGACY, steps=4,
                                                  dump=str(tmp)), tmp)[0]
    return tmp, result


def test_deepspeed_format_resumes_exactly_on_its_own_layout(legacy):
    tmp, result = legacy
    assert "mp_rank_00_model_states.pt" in result["files"] and "mom_state.json" in result["files"]
    assert not any(f.endswith(".safetensors") for f in result["files"])  # nothing of our format
    assert result["first"] == result["full"][:2]
    assert result["resumed"] == result["full"][2:]  # bitwise: DeepSpeed restored every state
    assert any("resumed from step 2" in line for line in result["log"]), result["log"]
    # written before checksums: one info line says so, no more
    noted = [line for line in result["log"] if "checksum" in line]
    assert len(noted) == 1 and "written before checksums existed: its files are not verified" in noted[0], noted


def test_deepspeed_format_exports_and_starts_runs_with_its_weights(legacy, tmp_path):
    tmp, _ = legacy
    saved = params(tmp, "saved")
    cfg, sd, state = consolidate(str(tmp / "legacy"))
    assert state["step"] == 2 and "format" not in state
    model = MoMModel(cfg)
    init_from_source(model, str(tmp / "legacy"))
    for name, p in model.state_dict().items():
        assert torch.equal(p, sd[name]), name
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0].endswith("_pool"):
            for i in range(p.shape[0]):
                assert torch.equal(p[i], saved[f"{name}[{i}]"]), name
        else:
            assert torch.equal(p, saved[name]), name
    proc = subprocess.run([sys.executable, "-m", "mom_dist.cli.convert", "export", str(tmp / "legacy"), "-o",
                           str(tmp_path / "export")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file
    assert digests(load_file(str(tmp_path / "export" / "model.safetensors"))) == digests(sd)
