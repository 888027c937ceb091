"""A pickle that would run code, planted in a Hugging Face GPT-2 directory, is refused in one line
(exit 2) by `mom-convert from-hf` and by `mom-train` with train.init_from, and never executed:
the payload would create a file, and the file must not exist afterwards. Same for a truncated
weights file (no traceback)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tests.dist_utils import ROOT
from tests.launch.launch_utils import BIN, clean_env, train_args
from tests.payloads import CreatesFile


def planted_gpt2_dir(root, marker) -> str:
    d = os.path.join(str(root), "gpt2")
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "n_embd": 32, "n_head": 2, "n_layer": 6, "vocab_size": 64,
                   "n_positions": 16}, f)
    torch.save({"transformer.wte.weight": torch.zeros(64, 32), "extra": CreatesFile(marker)},
               os.path.join(d, "pytorch_model.bin"))
    return d


@pytest.fixture
def planted(tmp_path):
    marker = tmp_path / "PWNED"
    return planted_gpt2_dir(tmp_path, marker), marker


def _one_line(err: str, tool: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), err[-3000:]
    return lines[0]


def test_from_hf_refuses_a_pickle_in_one_line(planted, tmp_path):
    src, marker = planted
    out = tmp_path / "out"
    p = subprocess.run([os.path.join(BIN, "mom-convert"), "from-hf", src, "--config",
                        os.path.join(ROOT, "configs", "tiny.yaml"), "-o", str(out)],
                       env=clean_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    line = _one_line(p.stderr, "mom-convert")
    assert f"{src}/pytorch_model.bin" in line and "could run code" in line, line
    assert not marker.exists() and not out.exists()


def test_init_from_refuses_a_pickle_in_one_line(planted, tmp_path):
    src, marker = planted
    out = tmp_path / "run"
    env = clean_env()
    env.pop("MASTER_PORT", None)
    p = subprocess.run([os.path.join(BIN, "mom-train"), *train_args(out, f"train.init_from={src}", "parallel.ep_size=1")],
                       env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    line = _one_line(p.stderr, "mom-train")
    assert f"{src}/pytorch_model.bin" in line and "could run code" in line, line
    assert not marker.exists()
    assert not os.path.exists(os.path.join(out, "checkpoints"))  # nothing trained, nothing saved


def test_truncated_weights_file_is_one_line(tmp_path, capsys):
    from mom_dist.cli.convert import main as convert_main

    src = planted_gpt2_dir(tmp_path, tmp_path / "unused")
    good = {"transformer.wte.weight": torch.zeros(64, 32)}
    torch.save(good, os.path.join(src, "pytorch_model.bin"))
    with open(os.path.join(src, "pytorch_model.bin"), "r+b") as f:
        f.truncate(100)
    assert convert_main(["from-hf", src, "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
                         "-o", str(tmp_path / "out")]) == 2
    line = _one_line(capsys.readouterr().err, "mom-convert")
    assert f"cannot read the weights in '{src}/pytorch_model.bin'" in line, line
    assert not (tmp_path / "out").exists()
