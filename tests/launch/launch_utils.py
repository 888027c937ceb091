"""What the launch tests share: the tiny training run every launch trains, a launcher-free
environment, and running a command with a timeout that reports the log."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.dist_utils import ROOT

BIN = os.path.dirname(sys.executable)
LAUNCHERS = os.path.join(ROOT, "launchers")
TRAIN_SET = [
    "data={synthetic: {seed: 1}}", "model.vocab_size=64", "model.max_seq_len=16", "model.d_model=32",
    "model.n_heads=2", "model.n_steps=2", "model.attn_router.dim=16", "model.ffn_router.dim=16",
    "train.seq_len=16", "train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=3",
    "train.eval_batches=1", "train.log_interval=1", "train.save_interval=3", "train.tensorboard=false",
    "parallel.ep_size=2",
]
LAUNCH_TIMEOUT = 240  # s per launch; a warm launch takes ~15 s on 2 cores


def train_args(out_dir, *extra) -> list[str]:
    args = ["--config", os.path.join(ROOT, "configs", "tiny.yaml")]
    for item in TRAIN_SET + [f"train.out_dir={out_dir}", *extra]:
        args += ["--set", item]
    return args


def clean_env(**extra) -> dict:
    """This process's environment without any launcher's variables (pytest may itself run
    under srun or mpirun), plus what every launch needs."""
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                     "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")
    env = {k: v for k, v in os.environ.items()
           if k not in launcher_vars and not k.startswith(("PMI_", "OMPI_", "MPI_LOCAL", "SLURM_", "HYDRA_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions")))
    env.update(extra)
    return env


def run(cmd, env, timeout=LAUNCH_TIMEOUT, check=True) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{cmd[0]} timed out after {timeout}s:\n{(e.output or '')[-4000:]}")
    if check:
        assert p.returncode == 0, f"{' '.join(cmd[:4])} ... exited {p.returncode}:\n{p.stdout[-6000:]}"
    return p
