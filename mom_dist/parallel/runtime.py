"""Process start-up and shutdown under every launcher we support.

``discover_launch_env()`` reads who we are from the launcher's variables - ``deepspeed``
(RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_SIZE/MASTER_*), ``torchrun`` (the same with LOCAL_WORLD_SIZE),
``mpirun`` (MPICH's PMI_*, Open MPI's
OMPI_COMM_WORLD_*), SLURM ``srun`` (SLURM_PROCID/...) - or none (one process), and checks it
before any collective starts: an inconsistent environment raises ``LaunchError`` naming the
variable and the fix instead of hanging in a rendezvous.

Unlike DeepSpeed's MPI discovery (which takes MASTER_ADDR from ``hostname -I``), we keep
MASTER_ADDR controllable: an explicit MASTER_ADDR wins. Under ``mpirun`` without MASTER_ADDR (or
MASTER_PORT), rank 0 finds an address of its own that every rank can connect to, and a free port,
and broadcasts both with mpi4py (``mpi_rendezvous``); where mpi4py cannot join this MPI (the
mpich wheel under Open MPI's mpirun) that is detected from the environment before MPI is touched,
and we fall back with one line saying why. Otherwise a single-node MPI/SLURM job defaults to
127.0.0.1 and a multi-node one without MASTER_ADDR is an error (the launchers in ``launchers/`` set
it).

After set-up, ``watch_collectives(timeout_s)`` bounds every collective (parallel.
collective_timeout_s) and starts a heartbeat (mom_dist.parallel.health) so that a rank which
stops answering is named by the ranks that time out waiting for it.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


class LaunchError(RuntimeError):
    pass


@dataclass
class LaunchEnv:
    launcher: str  # single | deepspeed | torchrun | env (RANK/WORLD_SIZE set otherwise) | mpi | slurm
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


def discover_launch_env(env: dict | None = None, rendezvous: bool = False) -> LaunchEnv:
    """Who this process is. ``rendezvous=True`` (init_distributed) lets an mpirun job without
    MASTER_ADDR/MASTER_PORT exchange them over mpi4py; every rank must then call this."""
    env = dict(os.environ if env is None else env)
    port = env.get("MASTER_PORT", "29500")
    if "RANK" in env and "WORLD_SIZE" in env:  # deepspeed / torchrun / our launchers / by hand
        # DeepSpeed's launcher names the node's process count LOCAL_SIZE (and the node CROSS_RANK),
        # torchrun LOCAL_WORLD_SIZE (and runs an elastic agent); anything else set RANK itself.
        launcher = ("deepspeed" if "CROSS_RANK" in env and "LOCAL_SIZE" in env else
                    "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env")
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        size_var = "LOCAL_SIZE" if launcher == "deepspeed" else "LOCAL_WORLD_SIZE"
        local_size = _int(env, size_var) if size_var in env else world
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
        if rendezvous and 0 <= rank < world and (not env.get("MASTER_ADDR") or "MASTER_PORT" not in env):
            found = mpi_rendezvous(env)
            if found:
                env["MASTER_ADDR"] = env.get("MASTER_ADDR") or found[0]
                env.setdefault("MASTER_PORT", str(found[1]))
                port = env["MASTER_PORT"]
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
            why = f" ({_MPI4PY_WHY})" if launcher == "mpi" and _MPI4PY_WHY else ""
            raise LaunchError(f"MASTER_ADDR is not set for a multi-node {launcher} job ({world} ranks, "
                              f"{local_size} per node){why}: export MASTER_ADDR=<first node's address> "
                              "(launchers/slurm.sbatch sets it)")
        addr = "127.0.0.1"
    return LaunchEnv(launcher, rank, world, local_rank, local_size, addr, int(port))


# ---------------------------------------------------------------------------- MPI rendezvous
_MPI4PY_WHY = ""  # why mpi4py was not used (for the error/fallback line), "" when it was or not needed


def _launching_mpi(env: dict) -> str:
    """The MPI family that started us, from its variables alone (touching MPI under the wrong
    library can abort the process)."""
    if any(k.startswith("OMPI_COMM_WORLD_") for k in env):
        return "openmpi"
    return "mpich"  # Hydra: MPICH, Intel MPI, MVAPICH (all MPICH ABI)


def _mpi4py_abi() -> str | None:
    """The MPI ABI the installed mpi4py would load ('mpich', 'openmpi', ...) without initialising
    MPI, or None when mpi4py is missing or cannot tell."""
    try:
        import mpi4py
        from mpi4py import _mpiabi  # mpi4py >= 4: picks the libmpi (MPI4PY_LIBMPI / MPI4PY_MPIABI aware)

        return _mpiabi._get_mpiabi()
    except ImportError:
        return None
    except Exception:  # an mpi4py < 4 (one ABI, fixed at build time) or no loadable libmpi
        try:
            import mpi4py

            cfg = mpi4py.get_config()
            return "openmpi" if "openmpi" in str(cfg).lower() else ("mpich" if cfg else None)
        except Exception:
            return None


def _candidate_addresses() -> list[str]:
    """This host's IPv4 addresses, most likely reachable first: what its names resolve to
    (non-loopback), the default route's source address, loopback last (single-host jobs)."""
    found = []
    for name in (socket.gethostname(), socket.getfqdn()):
        try:
            found += [ai[4][0] for ai in socket.getaddrinfo(name, None, socket.AF_INET)]
        except OSError:
            pass
    try:  # a UDP connect sends nothing; it asks the kernel which source address it would use
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            found.append(s.getsockname()[0])
    except OSError:
        pass
    found.append("127.0.0.1")
    out = []
    for a in found:
        if a not in out:
            out.append(a)
    return sorted(out, key=lambda a: a.startswith("127."))


def _reachable(addrs: list[str], port: int, timeout: float = 2.0) -> list[bool]:
    ok = []
    for a in addrs:
        try:
            with socket.create_connection((a, port), timeout=timeout):
                ok.append(True)
        except OSError:
            ok.append(False)
    return ok


def mpi_rendezvous(env: dict) -> tuple[str, int] | None:
    """Under mpirun: rank 0 lists its addresses and opens a listening socket; every rank tries to
    connect to each; the first address all ranks reached becomes MASTER_ADDR, and a port free on
    rank 0 MASTER_PORT (collision-free, unlike a fixed default). Returns None (and records why in
    _MPI4PY_WHY, printed once by rank 0) when mpi4py is missing or belongs to another MPI."""
    global _MPI4PY_WHY
    launching, abi = _launching_mpi(env), _mpi4py_abi()
    if abi is None:
        _MPI4PY_WHY = "mpi4py is not installed (pip install mpi4py), so no address exchange"
    elif abi != launching and not (abi == "mpiabi" and launching == "mpich"):
        _MPI4PY_WHY = (f"the installed mpi4py loads {abi}'s libmpi but {launching} started this job, and "
                       f"initialising it would abort ('unsupported PMI version'); set MPI4PY_LIBMPI to "
                       f"{launching}'s libmpi to use it")
    if _MPI4PY_WHY:
        if env.get("PMI_RANK", env.get("OMPI_COMM_WORLD_RANK")) == "0":
            print(f"mom-train: note: not using mpi4py for the rendezvous: {_MPI4PY_WHY}; "
                  "using MASTER_ADDR/MASTER_PORT", file=sys.stderr, flush=True)
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    world = int(env.get("PMI_SIZE") or env.get("OMPI_COMM_WORLD_SIZE") or 0)
    if comm.Get_size() != world:  # MPI came up as a singleton: it did not see this job's launcher
        _MPI4PY_WHY = f"mpi4py sees {comm.Get_size()} processes, the launcher started {world}"
        MPI.Finalize()
        return None
    try:
        listener = None
        if comm.Get_rank() == 0:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", 0))
            listener.listen(128)
            offer = (_candidate_addresses(), listener.getsockname()[1], _free_port_any())
        else:
            offer = None
        addrs, probe_port, port = comm.bcast(offer, root=0)
        ok = _reachable(addrs, probe_port)
        all_ok = comm.allgather(ok)
        if listener is not None:
            listener.close()
        common = [a for i, a in enumerate(addrs) if all(r[i] for r in all_ok)]
        if not common:
            _MPI4PY_WHY = f"no address of rank 0 ({', '.join(addrs)}) was reachable from every rank"
            return None
        return common[0], port
    finally:
        MPI.Finalize()  # MPI only carried the address; exiting later without Finalize upsets Hydra


def _free_port_any() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> LaunchEnv:
    """Initialise torch.distributed and DeepSpeed's comm layer for this launch (no-op when
    already initialised). A single process still gets a 1-rank group so one code path runs."""
    launch = discover_launch_env(rendezvous=True)
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

    if launch.world_size > 1:  # maps the PIDs launchers report (MPICH, DeepSpeed) to ranks and hosts
        print(f"[mom_dist] rank {launch.rank}/{launch.world_size} on host {socket.gethostname()} "
              f"(pid {os.getpid()}), local rank {launch.local_rank}/{launch.local_size}, {launch.launcher} launch, "
              f"MASTER_ADDR={launch.master_addr}:{launch.master_port}", flush=True)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    return launch


def watch_collectives(timeout_s: float) -> None:
    """End of set-up: from now on every collective of every process group gives up after
    ``timeout_s`` (a rendezvous and set-up may take longer: data index, JIT builds), and this
    rank's heartbeat runs so the ranks that time out can name the one that stopped answering."""
    if not dist.is_initialized():
        return
    from torch.distributed import distributed_c10d as c10d

    from mom_dist.parallel import health

    timeout = datetime.timedelta(seconds=timeout_s)
    for group in list(getattr(c10d, "_world").pg_map):
        try:
            c10d._set_pg_timeout(timeout, group)
        except Exception:  # a backend without a settable timeout (then the init timeout holds)
            pass
    health.start(dist.get_rank(), dist.get_world_size())


def shutdown(exit_code: int = 0, together: bool | None = None) -> None:
    """End a rank. When every rank leaves together (finished, preempted, diverged: ``together``
    defaults to exit_code 0): barrier, destroy the process group, flush, ``os._exit`` - a gloo
    thread can otherwise outlive the interpreter and abort a finished run (10-20% of 2-rank runs
    here), and under ``srun --kill-on-bad-exit`` a rank that leaves with 75 before the others
    are done would get them killed. A failing rank leaves at once."""
    if (exit_code == 0 if together is None else together) and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception as e:  # a peer is already gone: leave anyway, with the code we have
            print(f"mom-train: note: leaving without the final barrier ({str(e).splitlines()[0][:200]})",
                  file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
