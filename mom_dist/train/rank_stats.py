"""Opt-in per-rank figures of a launch, for the scale rehearsal (benchmarks/scale_rehearsal.py).

With ``MOM_DIST_RANK_STATS=DIR`` set, every rank of mom-train writes ``DIR/rank<R>.json`` (after
its first optimizer step, again at the end) with:

- ``marks``: wall-clock times (seconds since the epoch) of the process start (from /proc), the
  trainer's entry (imports done), the process group (rendezvous), DeepSpeed's expert/data groups,
  the engine, the checkpoint load, every optimizer step (``first_step`` too), each checkpoint
  save (start, end), the end;
- ``collectives``: calls of every torch.distributed collective (and ``new_group``) up to each
  mark, counted by wrapping the functions before DeepSpeed caches them;
- ``held``: bytes of parameters, fp32 master copies and AdamW states this rank holds, from the
  storages DeepSpeed allocated (what ``mom_dist.plan.memory.param_state_bytes`` predicts);
- ``peak_rss``: the process's peak resident memory (bytes).

Unset (the default), nothing is wrapped or written. Nothing here changes the computation.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from collections import Counter

import torch

COUNTED = ("all_reduce", "all_to_all_single", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
           "broadcast", "barrier", "reduce", "all_gather_object", "broadcast_object_list", "new_group",
           "send", "recv", "isend", "irecv")


def _process_start() -> float | None:
    """This process's start time (epoch seconds), from /proc (Linux; to 1/100 s); None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, after the name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class RankStats:
    """Does nothing unless ``MOM_DIST_RANK_STATS`` names a directory."""

    def __init__(self):
        self.dir = os.environ.get("MOM_DIST_RANK_STATS") or None
        self.marks: dict[str, float] = {}
        self.calls: Counter = Counter()
        self.at_mark: dict[str, dict] = {}
        self.info: dict = {}
        if self.dir:
            self.marks["process_start"] = _process_start() or time.time()
            self.mark("trainer_entry")
            self._wrap()

    def _wrap(self) -> None:
        import torch.distributed as dist

        for name in COUNTED:
            fn = getattr(dist, name, None)
            if fn is None or getattr(fn, "_mom_counted", False):
                continue

            def counted(*args, _fn=fn, _name=name, **kwargs):
                self.calls[_name] += 1
                return _fn(*args, **kwargs)

            counted._mom_counted = True
            setattr(dist, name, counted)

    def mark(self, name: str) -> None:
        if self.dir:
            self.marks[name] = time.time()
            self.at_mark[name] = dict(self.calls)

    def step(self, step: int, first: bool, engine, dims) -> None:
        """After each optimizer step; after the first, the held bytes (AdamW states exist now)
        and a first record (a run killed later still leaves its start-up figures)."""
        if not self.dir:
            return
        self.mark(f"step_{step}")
        if first:
            self.mark("first_step")
            self.info["held"] = held_bytes(engine)
            self.write(dims)

    def write(self, dims, **info) -> None:
        if not self.dir:
            return
        self.info.update(info)
        record = {"rank": dims.rank, "world": dims.world_size, "ep": dims.ep_size, "host": socket.gethostname(),
                  "pid": os.getpid(), "marks": self.marks, "collectives": self.at_mark, "total": dict(self.calls),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **self.info}
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"rank{dims.rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)


def held_bytes(engine) -> dict:
    """Bytes this rank holds, by category, from the storages DeepSpeed actually allocated.

    params: storages behind the model's parameters (under ZeRO 1/2 these are DeepSpeed's flat,
    padded buffers, viewed by the parameters). master: the inner optimizer's parameters that are
    not model storage (ZeRO 1/2's fp32 partitions). states: every tensor in the inner optimizer's
    state (exp_avg, exp_avg_sq, step). Each split into module (expert) / non-module.
    """
    from mom_dist.parallel.expert_parallel import module_parameters

    def key(t: torch.Tensor):
        return t.untyped_storage().data_ptr()

    module_ids = {id(p) for _, p in module_parameters(engine.module)}
    out: Counter = Counter()
    seen, model_storages = set(), set()
    for p in engine.module.parameters():
        k = key(p)
        model_storages.add(k)
        if k in seen:
            continue
        seen.add(k)
        out[f"params_{'module' if id(p) in module_ids else 'other'}"] += p.untyped_storage().nbytes()
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in inner.param_groups:
        kind = "module" if group.get("moe", False) else "other"
        for p in group["params"]:
            k = key(p)
            if k not in model_storages and k not in seen:
                seen.add(k)
                out[f"master_{kind}"] += p.untyped_storage().nbytes()
            for v in inner.state.get(p, {}).values():
                if isinstance(v, torch.Tensor) and key(v) not in seen:
                    seen.add(key(v))
                    out[f"states_{kind}"] += v.untyped_storage().nbytes()
    return dict(out)
