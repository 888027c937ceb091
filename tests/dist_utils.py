"""Run worker functions of ``tests/parallel/workers.py`` in real processes (gloo, localhost)."""

from __future__ import annotations

import os

from mom_dist.parallel.local_launch import REPO as ROOT
from mom_dist.parallel.local_launch import RankFailure, free_port, run_ranks
from mom_dist.parallel.local_launch import rank_env as worker_env

__all__ = ["ROOT", "free_port", "worker_env", "run_workers"]


def run_workers(fn: str, world: int, args: dict, tmp_path, timeout: int = 600) -> list[dict]:
    try:
        return run_ranks(os.path.join(ROOT, "tests", "parallel", "workers.py"), fn, world, args, str(tmp_path), timeout)
    except RankFailure as e:
        raise AssertionError(str(e)) from None
