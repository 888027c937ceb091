"""Start real worker processes (gloo, localhost) the way torchrun would, and collect results.

A worker is a function ``fn(args: dict) -> dict`` in ``tests/parallel/workers.py``; every rank
runs it and writes its result as JSON. No mocks: real processes, real collectives.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return env


def run_workers(fn: str, world: int, args: dict, tmp_path, timeout: int = 600) -> list[dict]:
    port = free_port()
    procs, outs = [], []
    for rank in range(world):
        out = os.path.join(str(tmp_path), f"{fn}_r{rank}_{port}.json")
        outs.append(out)
        cmd = [sys.executable, os.path.join(ROOT, "tests", "parallel", "workers.py"), fn, json.dumps(args), out]
        procs.append(subprocess.Popen(cmd, env=worker_env(rank, world, port), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"workers for {fn} timed out after {timeout}s")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} of {fn} exited {p.returncode}:\n{log[-6000:]}"
    return [json.load(open(o)) for o in outs]
