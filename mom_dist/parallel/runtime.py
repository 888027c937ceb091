"""Process start-up and shutdown under every launcher we support.

``discover_launch_env()`` reads who we are from the launcher's variables - ``deepspeed`` and
``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*), ``mpirun`` (MPICH's PMI_*, Open MPI's
OMPI_COMM_WORLD_*), SLURM ``srun`` (SLURM_PROCID/...) - or none (one process), and checks it
before any collective starts: an inconsistent environment raises ``LaunchError`` naming the
variable and the fix instead of hanging in a rendezvous.

Unlike DeepSpeed's MPI discovery (which takes MASTER_ADDR from ``hostname -I``), we keep
MASTER_ADDR controllable: an explicit MASTER_ADDR wins; a single-node MPI/SLURM job defaults to
127.0.0.1; a multi-node one without MASTER_ADDR is an error (the launchers in ``launchers/``
set it).
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


class LaunchError(RuntimeError):
    pass


@dataclass
class LaunchEnv:
    launcher: str  # single | torchrun | mpi | slurm
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    master_addr: str
    master_port: int


def _int(env, name):
    value = env.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"environment variable {name}={value!r} is not an integer; check the launcher command")


def discover_launch_env(env: dict | None = None) -> LaunchEnv:
    env = dict(os.environ if env is None else env)
    port = env.get("MASTER_PORT", "29500")
    if "RANK" in env and "WORLD_SIZE" in env:  # deepspeed / torchrun / our launchers
        launcher = "torchrun"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_size = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
    elif "PMI_RANK" in env or "OMPI_COMM_WORLD_RANK" in env:
        launcher = "mpi"
        if "PMI_RANK" in env:  # MPICH / Intel MPI (Hydra)
            rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
            local_rank = _int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else rank
            local_size = _int(env, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in env else world
        else:
            rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
            local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
            local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1"
        if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
            local_size = _int(env, "SLURM_NTASKS_PER_NODE")
        elif nodes.isdigit() and int(nodes) > 1:  # srun -n N -N M without --ntasks-per-node: still multi-node
            local_size = -(-world // int(nodes))
        else:
            local_size = world
    else:  # one process: a private rendezvous on a free loopback port (two runs may share a host)
        return LaunchEnv("single", 0, 1, 0, 1, "127.0.0.1", int(port) if "MASTER_PORT" in env else _free_port())
    if not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is outside the world of {world} processes ({launcher} launcher); "
                          "check the launcher's process count")
    if not port.isdigit():
        raise LaunchError(f"MASTER_PORT={port!r} must be a port number")
    addr = env.get("MASTER_ADDR")
    if not addr:
        if world > local_size:
            raise LaunchError(f"MASTER_ADDR is not set for a multi-node {launcher} job ({world} ranks, "
                              f"{local_size} per node): export MASTER_ADDR=<first node's address> "
                              "(launchers/slurm.sbatch and launchers/mpirun.sh do this)")
        addr = "127.0.0.1"
    return LaunchEnv(launcher, rank, world, local_rank, local_size, addr, int(port))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> LaunchEnv:
    """Initialise torch.distributed and DeepSpeed's comm layer for this launch (no-op when
    already initialised). A single process still gets a 1-rank group so one code path runs."""
    launch = discover_launch_env()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchError("parallel.backend=nccl needs CUDA GPUs; use backend gloo (or auto) on CPU")
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank),
                      LOCAL_WORLD_SIZE=str(launch.local_size), MASTER_ADDR=launch.master_addr,
                      MASTER_PORT=str(launch.master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    return launch


def shutdown(exit_code: int = 0) -> None:
    """End a rank. On success: barrier, destroy the process group, flush, ``os._exit`` - a gloo
    thread can otherwise outlive the interpreter and abort a finished run (10-20% of 2-rank
    runs here)."""
    if exit_code == 0 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
