"""The transformers export in a venv that never had mom_dist (torch, transformers, sentencepiece,
safetensors only, at the versions of ours): the same checks as test_hf_export.py.

The venv is built once and kept under the temp directory, keyed by a hash of what it holds
(about a minute to build from the local torch wheel); the test skips, saying why, when pip
cannot install it here. Marked ``slow``.
"""

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from importlib import metadata

import pytest
import torch

from mom_dist.convert.hf import export_hf
from mom_dist.model import MoMModel
from tests.export.test_hf_export import (TEXTS, assert_matches_ours, make_inputs, routed_config, run_check,
                                         tiny_tokenizer)

PACKAGES = ["torch", "transformers", "sentencepiece", "safetensors"]


def clean_venv() -> str:
    """Python of a venv with exactly our versions of PACKAGES and nothing of mom_dist."""
    pins = [f"{p}=={metadata.version(p).split('+')[0]}" for p in PACKAGES]
    key = hashlib.sha256(" ".join(pins + [sys.version]).encode()).hexdigest()[:12]
    root = os.path.join(tempfile.gettempdir(), f"mom_dist_hf_venv_{key}")
    python = os.path.join(root, "bin", "python")
    with open(root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build even when several sessions run the test
        if not os.path.exists(os.path.join(root, ".complete")):
            subprocess.run([sys.executable, "-m", "venv", "--clear", root], check=True, capture_output=True)
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
            proc = subprocess.run([python, "-m", "pip", "install", "-q", *pins], env=env, capture_output=True,
                                  text=True, timeout=1200)
            if proc.returncode != 0:
                pytest.skip(f"cannot build a clean venv here ({' '.join(pins)}): {proc.stderr.strip()[-400:]}")
            open(os.path.join(root, ".complete"), "w").close()
    return python


@pytest.mark.slow
def test_export_in_a_clean_venv_matches_ours(tmp_path):
    python = clean_venv()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    probe = subprocess.run([python, "-c", "import mom_dist"], env=env, cwd=tmp_path, capture_output=True)
    assert probe.returncode != 0, "the clean venv can import mom_dist"
    tokenizer = tiny_tokenizer(str(tmp_path))
    torch.manual_seed(0)
    model = MoMModel(routed_config(400)).eval()
    hf_dir = export_hf(model, str(tmp_path / "hf"), tokenizer=tokenizer)
    x = make_inputs(400, TEXTS)
    assert_matches_ours(model, run_check(python, hf_dir, x, tmp_path, env=env), x, tokenizer)
