"""Shared test settings: deterministic CPU threads and a per-venv torch extensions dir."""

import os
import sys

import pytest
import torch

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
# One ninja for every process (the venv's, as under `make`): DeepSpeed rebuilds its JIT ops
# whenever the ninja on PATH changes.
_bin = os.path.dirname(sys.executable)
if not os.environ.get("PATH", "").startswith(_bin + os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
