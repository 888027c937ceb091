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


# Opt-in marks: tests that take minutes and run only when asked for (``pytest -m NAME``; .ci/run
# does, after the default suite). A plain ``pytest tests`` skips them, saying how to run them.
OPT_IN = {
    "slow": ("takes minutes (builds a clean virtualenv without mom_dist)", "pytest -m slow tests/export"),
    "cluster": ("starts real SLURM/sshd/MPI daemons, minutes", "pytest -m cluster tests/launch"),
}


def pytest_configure(config):
    for name, (what, how) in OPT_IN.items():
        config.addinivalue_line("markers", f"{name}: {what}; run with `{how}` (.ci/run does)")


def pytest_collection_modifyitems(config, items):
    selected = config.getoption("-m") or ""
    for name, (what, how) in OPT_IN.items():
        if name in selected:
            continue
        skip = pytest.mark.skip(reason=f"{name} test ({what}): run `{how}`, as .ci/run does")
        for item in items:
            if name in item.keywords:
                item.add_marker(skip)
