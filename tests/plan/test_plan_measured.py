"""The planner's predictions against live measurements at the benchmark's configurations.

``benchmarks/expert_parallel.py`` measures per-rank parameter / fp32 master / AdamW state bytes
(part B) and all-to-all bytes (part A) in real gloo processes. These tests compute the
planner's prediction for exactly those configurations (the benchmark's ``SMALL`` model and
``A2A_CASES``, world 4) and compare with numbers measured here by the benchmark's own worker
code (``benchmarks/_ep_worker.py``, via ``tests/plan/plan_worker.py``), not with copied results.
"""

from __future__ import annotations

import os
import sys

import pytest

from mom_dist.config import TrainConfig
from mom_dist.parallel.local_launch import RankFailure, run_ranks
from mom_dist.plan.memory import param_state_bytes
from mom_dist.plan.model_size import param_counts
from mom_dist.plan.traffic import a2a_bytes_per_microbatch, capacity_plan_bytes, plan_bytes, read_routing
from mom_dist.train.metrics import MetricsWriter
from tests.dist_utils import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import expert_parallel as bench  # noqa: E402  (the benchmark's SMALL model and A2A_CASES)
from _ep_worker import model_config  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "plan", "plan_worker.py")
WORLD = 4


def run(fn: str, args: dict, tmp_path) -> list[dict]:
    try:
        return run_ranks(WORKER, fn, WORLD, args, str(tmp_path), timeout=600)
    except RankFailure as e:
        raise AssertionError(str(e)) from None


@pytest.mark.parametrize("precision,eps,zeros", [("fp32", [1, 2, 4], [0, 1, 2]), ("bf16", [1, 4], [0, 1])])
def test_memory_matches_deepspeed_engine(precision, eps, zeros, tmp_path):
    """Parameters, fp32 master and AdamW states per rank, EP x ZeRO layouts of world 4 (the
    benchmark's; bf16 on fewer layouts to save time: its formula differs only in ZeRO 0's master)."""
    res = run("memory", dict(model=bench.SMALL, eps=eps, zeros=zeros, precision=precision), tmp_path)
    counts = param_counts(model_config(bench.SMALL, 1, 1))
    assert len(res[0]) == len(eps) * len(zeros)
    for key, r0 in res[0].items():
        assert (counts.total, counts.module) == (r0["p_total"], r0["p_module"])
        pred = param_state_bytes(counts, r0["ep"], r0["zero"], WORLD, precision)
        for rank in res:
            held = rank[key]["held"]
            got = {"params": held.get("params_module", 0) + held.get("params_other", 0),
                   "master": held.get("master_module", 0) + held.get("master_other", 0),
                   "states": held.get("states_module", 0) + held.get("states_other", 0)}
            for cat in ("params", "master", "states"):
                # DeepSpeed pads its flat ZeRO buffers for alignment; AdamW keeps a `step` scalar per tensor
                assert got[cat] == pytest.approx(pred[cat], rel=2e-3, abs=4096), (key, cat, got, pred)


def test_all_to_all_bytes_match_dispatcher(tmp_path):
    """Exact byte accounting (given each plan's U and Wp) for every dropless and capacity case,
    and the telemetry-based estimate (what ``--routing RUN_DIR`` uses) for the dropless ones."""
    m = bench.SMALL
    res = run("a2a", dict(model=m, cases=bench.A2A_CASES), tmp_path)
    d, n = m["d_model"], m["modules"]
    deviations = {}
    for case in bench.A2A_CASES:
        ep, k, name = case["ep"], case["k"], case["name"]
        per_rank = [r[name] for r in res]
        mcfg = model_config(m, k, k, activation_checkpointing=case.get("ac", False))
        pred_payload = 0.0
        for r in per_rank:
            if "cf" in case:
                pred = [capacity_plan_bytes(pool, tokens=r["tokens"], top_k=k, d=d, ep=ep, n_modules=n,
                                            capacity_factor=case["cf"], act_bytes=4) for pool, _, _ in r["plans"]]
            else:
                pred = [plan_bytes(pool, u=u, wp=wp, d=d, ep=ep, n_modules=n, act_bytes=4) for pool, u, wp in r["plans"]]
            pred_payload += sum(p.payload for p in pred)
            # control (split counts, pair metadata, valid masks) leaves each rank as predicted
            assert sum(p.control for p in pred) == r["wire_fwd_control"], (name, pred, r["wire_fwd_control"])
            assert r["wire_bwd_control"] == 0, (name, r)  # backward re-sends payload only
        # Payload: a rank sends its tokens out and other ranks' results back, so only the total
        # over ranks equals the sum of the senders' U x row + Wp (the planner's per-rank figure is
        # that total / world, the mean).
        sent = sum(r["bytes_sent"] for r in per_rank)
        assert pred_payload == sent == sum(r["wire_fwd_payload"] for r in per_rank), (name, pred_payload, sent)
        # backward: the reverse all-to-alls move the same payload again (per rank the directions swap)
        assert sum(r["wire_bwd_payload"] for r in per_rank) == sent, name
        if "cf" in case:
            continue
        # Estimate from the routing telemetry the trainer writes (all ranks' loads, summed).
        run_dir = tmp_path / name
        writer = MetricsWriter(str(run_dir), True, False)
        tel = per_rank[0]["telemetry"]
        writer.write("routing", 1, tel)  # the record the trainer writes
        writer.close()
        profile = read_routing(str(run_dir), mcfg)
        est = a2a_bytes_per_microbatch(mcfg, profile, tokens=per_rank[0]["tokens"], ep=ep, precision="fp32")
        measured = sum(r["bytes_sent"] for r in per_rank) / WORLD
        deviations[name] = est.payload / measured - 1
    report = {k: f"{v:+.4f}" for k, v in deviations.items()}
    print("telemetry estimate / measured - 1:", report)
    # K=1: exact in expectation (only the source rank's share of each module is assumed);
    # K=2 also approximates how a token's two distinct picks spread over ranks.
    assert all(abs(v) < 0.10 for v in deviations.values()), report


def test_benchmark_train_config_is_the_planner_input():
    """The memory benchmark trains with a global batch of batch x world (one micro-batch)."""
    t = TrainConfig(global_batch_size=bench.SMALL["batch"] * WORLD, micro_batch_size=bench.SMALL["batch"])
    t.validate()
