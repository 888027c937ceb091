"""Per-rank measurements the planner is checked against (real gloo processes, one per rank).

    python tests/plan/plan_worker.py <function> '<json args>' <result.json>

Reuses ``benchmarks/_ep_worker.py``'s model builder, batches, ``A2AMeter`` (wraps
``all_to_all_single`` and counts the bytes each call sends to other ranks) and its recount of
U / Wp from the routing ids, so these are the benchmark's own measurements; it adds, per
plan, the (pool, U, Wp) the planner's byte formula needs and the routing telemetry the
trainer would write.
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

# ``memory`` is the benchmark's own measurement, run by name through worker_main
from _ep_worker import A2AMeter, batch, dropless_min_elems, memory, model_config  # noqa: E402,F401

from mom_dist.model import MoMModel  # noqa: E402
from mom_dist.parallel.dims import build_parallel_dims  # noqa: E402
from mom_dist.parallel.expert_parallel import apply_expert_parallel  # noqa: E402
from mom_dist.parallel.local_launch import worker_main  # noqa: E402
from mom_dist.train.telemetry import StepTelemetry, routing_record  # noqa: E402


def a2a(args: dict) -> dict:
    """For each case: one training forward + backward through the all-to-all dispatcher."""
    m = args["model"]
    out = {}
    for case in args["cases"]:
        ep, k, cf = case["ep"], case["k"], case.get("cf")
        dims = build_parallel_dims(ep)
        torch.manual_seed(0)
        model = MoMModel(model_config(m, k, k, activation_checkpointing=case.get("ac", False)))
        apply_expert_parallel(model, dims, cf)
        model.train()
        step_tel = StepTelemetry(model, dims)  # what the trainer records for a step
        ids, labels = batch(m, m["batch"], 1000 + dims.rank)
        with A2AMeter() as meter:
            res = model(ids, labels)
            meter.phase = "bwd"
            res.loss.backward()
        plans = []
        for rec in res.routing:
            _, u, wp, _ = dropless_min_elems(rec.ids_TK, m["modules"], ep, dims.ep_rank, m["d_model"], rec.pool,
                                             model.cfg.qkv_weighted)
            plans.append([rec.pool, u, wp])
        sent = sum(c.dispatcher.bytes_sent for c in model.chunks)
        step_tel.add(res.routing)
        tel = routing_record(step_tel.reduce())  # all ranks: it all-reduces
        out[case["name"]] = dict(
            plans=plans, bytes_sent=sent, tokens=ids.numel(), telemetry=tel,
            wire_fwd_payload=meter.bytes[("fwd", "payload")], wire_fwd_control=meter.bytes[("fwd", "control")],
            wire_bwd_payload=meter.bytes[("bwd", "payload")], wire_bwd_control=meter.bytes[("bwd", "control")])
        del model, res
    return out


if __name__ == "__main__":
    worker_main(globals(), threads=1)
