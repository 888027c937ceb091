"""Start N ranks of a worker script on this machine, the way torchrun would, and collect what
each returns. Used by the multi-process tests and the benchmarks (real processes, real gloo
collectives).

A worker script ends with ``worker_main(globals())``: it is run as
``python SCRIPT FN ARGS_JSON OUT_PATH`` per rank, calls ``FN(args) -> dict`` after initialising
the process group, writes the dict as JSON and ends the rank cleanly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RankFailure(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return env


def run_ranks(script: str, fn: str, world: int, args: dict, out_dir: str, timeout: int = 600) -> list[dict]:
    port = free_port()
    procs, outs = [], []
    for rank in range(world):
        outs.append(os.path.join(str(out_dir), f"{fn}_r{rank}_{port}.json"))
        procs.append(subprocess.Popen([sys.executable, script, fn, json.dumps(args), outs[-1]],
                                      env=rank_env(rank, world, port), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RankFailure(f"ranks of {fn} timed out after {timeout}s")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode != 0:
            raise RankFailure(f"rank {rank} of {fn} exited {p.returncode}:\n{log[-6000:]}")
    return [json.load(open(o)) for o in outs]


def worker_main(functions: dict, threads: int | None = None) -> None:
    """Entry point of a worker script: run ``functions[FN](args)`` on this rank."""
    import torch

    from mom_dist.parallel.runtime import init_distributed, shutdown

    fn, args, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    if threads:
        torch.set_num_threads(threads)
    if args.get("init", True):
        init_distributed("gloo")
    result = functions[fn](args)
    with open(out, "w") as f:
        json.dump(result, f)
    shutdown(0)
