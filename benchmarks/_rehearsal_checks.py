"""The scale rehearsal's checks and figures (``benchmarks/scale_rehearsal.py``): each returns
(passed, detail) from what a run left behind - its metrics.jsonl, its checkpoints and every
rank's ``MOM_DIST_RANK_STATS`` record - against the 1-process run or the planner (the functions
``mom-plan`` runs: ``mom_dist.plan``).
"""

from __future__ import annotations

import math
import os
import statistics

from mom_dist.config import load_config
from mom_dist.plan.cluster import ClusterConfig
from mom_dist.plan.memory import param_state_bytes
from mom_dist.plan.model_size import param_counts
from mom_dist.plan.planner import plan_layouts
from mom_dist.plan.traffic import A2A_CALLS_PER_STEP, a2a_bytes_per_microbatch, read_routing

REL = 1e-5  # losses and weights against the 1-process run (fp32; as tests/parallel/test_reshard.py)


def losses_match(got: dict[int, float], ref: dict[int, float], steps) -> tuple[bool, str]:
    steps = list(steps)
    missing = [s for s in steps if s not in got]
    if missing or not steps:
        return False, f"steps {missing or steps} have no loss"
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in steps)
    return worst <= REL, f"steps {steps[0]}-{steps[-1]}: max rel diff {worst:.1e}"


def weights_match(out_dir: str, ref_dir: str) -> tuple[bool, str]:
    import torch

    from mom_dist.checkpoint.consolidate import consolidate

    _, got, _ = consolidate(out_dir)
    _, want, _ = consolidate(ref_dir)
    if got.keys() != want.keys():
        return False, f"different parameter names ({len(got)} vs {len(want)})"
    worst, bad = 0.0, []
    for k, w in want.items():
        g, w = got[k].float(), w.float()
        worst = max(worst, float((g - w).abs().max()))
        if not torch.allclose(g, w, rtol=REL, atol=1e-6):
            bad.append(k)
    return not bad, (f"{len(want)} tensors within rel {REL:g} + abs 1e-6, max abs diff {worst:.1e}"
                     + (f"; differ: {', '.join(bad[:3])}" if bad else ""))


def run_config(run):
    return load_config(os.path.join(run.out_dir, "config.json"))


def planned(run):
    """The planner's layout for this run (what ``mom-plan CONFIG --cluster NODESxPER_NODE`` lists:
    same EP, ZeRO, micro-batch 1, no activation checkpointing)."""
    cfg = run_config(run)
    cluster = ClusterConfig(nodes=run.nodes, gpus_per_node=run.world // run.nodes, name="rehearsal")
    cluster.validate()
    plan = plan_layouts(cfg, cluster)
    lay = next(x for x in plan.layouts if (x.ep, x.zero, x.micro_batch, x.checkpointing) ==
               (run.ep, run.zero, cfg.train.micro_batch_size, cfg.model.activation_checkpointing))
    return cfg, lay


def a2a_bytes(run) -> tuple[bool, str]:
    """Capacity dispatch: every rank's all-to-all payload of every step (routing telemetry) equals
    the planner's figure byte for byte. Dropless: the bytes depend on where each token's picks
    land; the planner's estimate from this run's own routing telemetry (``mom-plan --routing``)
    is compared with the measured mean (within 10%, as tests/plan/test_plan_measured.py)."""
    if run.ep == 1:
        return True, "EP 1: no all-to-all"
    cfg, lay = planned(run)
    m, t = cfg.model, cfg.train
    tokens = t.micro_batch_size * t.seq_len
    records = run.records("routing")
    if not records:
        return False, "no routing telemetry in metrics.jsonl"
    if run.dispatcher == "capacity":
        per_mb = a2a_bytes_per_microbatch(m, read_routing(run.out_dir, m), tokens=tokens, ep=run.ep,
                                          precision=t.precision, dispatcher="capacity",
                                          capacity_factor=cfg.parallel.capacity_factor)
        want = lay.accumulation * per_mb.payload
        consistent = lay.a2a_bytes_step == lay.accumulation * (2 * per_mb.payload + per_mb.control)
        got = {b for r in records for b in r["a2a_bytes_per_rank"]}
        ok = got == {int(want)} and want == int(want) and consistent
        return ok, (f"{len(records)} steps x {run.world} ranks: {sorted(got)} B/step/rank forward; planner "
                    f"{want:,.0f} (x2 for backward + {lay.accumulation * per_mb.control:,.0f} control = "
                    f"{lay.a2a_bytes_step:,.0f} B/step, mom-plan's a2a column)")
    last = records[-1]
    measured = sum(last["a2a_bytes_per_rank"]) / run.world
    est = lay.accumulation * a2a_bytes_per_microbatch(m, read_routing(run.out_dir, m), tokens=tokens, ep=run.ep,
                                                      precision=t.precision).payload
    dev = est / measured - 1
    return abs(dev) <= 0.10, (f"estimate (dropless): measured {measured:,.0f} B/step/rank, planner with this run's "
                              f"routing {est:,.0f} ({dev:+.1%})")


def memory(run, stats: list[dict]) -> tuple[bool, str]:
    """Every rank's parameters, fp32 master and AdamW states (bytes DeepSpeed allocated) equal
    the planner's ``param_state_bytes`` up to DeepSpeed's alignment padding (rel 2e-3 + 4 KiB)."""
    cfg, lay = planned(run)
    pred = param_state_bytes(param_counts(cfg.model), run.ep, run.zero, run.world, cfg.train.precision)
    worst, bad = 0.0, []
    for r in stats:
        held = r.get("held") or {}
        got = {c: held.get(f"{c}_module", 0) + held.get(f"{c}_other", 0) for c in ("params", "master", "states")}
        for c, v in got.items():
            err = abs(v - pred[c])
            worst = max(worst, err / max(pred[c], 1))
            if err > 2e-3 * pred[c] + 4096:
                bad.append(f"rank {r['rank']} {c} {v} vs {pred[c]:.0f}")
    if len(stats) != run.world or any("held" not in r for r in stats):
        return False, f"{len(stats)} of {run.world} ranks reported"
    rss = max(r["peak_rss"] for r in stats) / 2 ** 20
    total = sum(pred[c] for c in ("params", "master", "states"))
    return not bad, (f"model states {total / 2 ** 20:.2f} MiB/rank as planned (max dev {worst:.1%}); planner's total "
                     f"incl. grads+activations {lay.memory.total / 2 ** 20:.2f} MiB; peak RSS max {rss:,.0f} MiB "
                     "(Python+torch+DeepSpeed)" + (f"; {'; '.join(bad[:2])}" if bad else ""))


# ------------------------------------------------------------------------------------ figures
def _counts_between(r: dict, a: str, b: str) -> dict:
    ca, cb = r["collectives"].get(a, {}), r["collectives"].get(b, {})
    return {k: cb.get(k, 0) - ca.get(k, 0) for k in cb if cb.get(k, 0) - ca.get(k, 0)}


def figures(run, stats: list[dict]) -> dict:
    """Start-up and collective figures of one run (all times in seconds from the launch)."""
    t0 = run.t0
    marks = {k: [r["marks"][k] - t0 for r in stats if k in r["marks"]]
             for k in ("process_start", "trainer_entry", "process_group", "groups", "engine", "first_step")}
    out = {"ranks": len(stats), "wall": run.wall}
    for k, v in marks.items():
        if v:
            out[k] = (min(v), statistics.median(v), max(v))
    if stats and all(k in out for k in ("trainer_entry", "process_group", "groups", "engine")):
        out["rendezvous"] = out["process_group"][2] - out["trainer_entry"][2]  # after the last rank arrived
        out["group_creation"] = max(r["marks"]["groups"] - r["marks"]["process_group"] for r in stats)
        out["engine_setup"] = max(r["marks"]["engine"] - r["marks"]["groups"] for r in stats)
    r0 = stats[0] if stats else None
    if r0:
        out["new_group"] = r0["collectives"].get("groups", {}).get("new_group", 0)
        out["setup_collectives"] = sum(r0["collectives"].get("checkpoint_load", {}).values())
        if "step_2" in r0["collectives"]:
            out["per_step"] = _counts_between(r0, "step_1", "step_2")
        saves = [(r0["marks"][k.replace("start", "end")] - r0["marks"][k]) for k in r0["marks"]
                 if k.startswith("save_start_") and k.replace("start", "end") in r0["marks"]]
        if saves:
            out["save"] = max(saves)
        out["first_steps"] = {r["rank"]: r["marks"]["first_step"] - t0 for r in stats if "first_step" in r["marks"]}
    ckpt = os.path.join(run.out_dir, "checkpoints")
    tags = sorted(x for x in os.listdir(ckpt) if x.startswith("step")) if os.path.isdir(ckpt) else []
    if tags:
        d = os.path.join(ckpt, tags[-1])
        out["ckpt_files"] = len(os.listdir(d))
        out["ckpt_meta_bytes"] = os.path.getsize(os.path.join(d, "mom_state.json"))
    return out


def a2a_calls_expected(run) -> int | None:
    """all_to_all_single calls per optimizer step the planner counts for dropless dispatch."""
    if run.ep == 1 or run.dispatcher != "dropless":
        return None
    cfg, lay = planned(run)
    m = cfg.model
    return lay.accumulation * m.n_chunks * m.n_steps * sum(A2A_CALLS_PER_STEP.values())


GROWTH = [("new_group", "new_group calls per rank (process-group creation)"),
          ("setup_collectives", "collectives per rank during set-up"),
          ("ckpt_meta_bytes", "checkpoint metadata (mom_state.json bytes)"),
          ("ckpt_files", "checkpoint files per step"),
          ("rendezvous", "rendezvous after the last rank arrived (s)"),
          ("group_creation", "expert/data group creation (s, slowest rank)"),
          ("engine_setup", "DeepSpeed engine set-up (s, slowest rank)"),
          ("save", "checkpoint save (s)"),
          ("wall", "job wall time (s)")]


def growth(by_world: dict[int, dict]) -> list[tuple[str, str, str, str]]:
    """(quantity, values by world, exponent, verdict) between the smallest and the largest world:
    value ~ world^exponent; above 1.25 is named. Counts are exact; times on 2 shared cores grow
    about linearly with the rank count by themselves (the ranks share the cores), so only an
    exponent well above 1 says the work per rank grows with the world; times under 0.5 s are
    not judged (scheduling noise on shared cores)."""
    worlds = sorted(by_world)
    rows = []
    if len(worlds) < 2:
        return rows
    lo, hi = worlds[0], worlds[-1]
    for key, label in GROWTH:
        a, b = by_world[lo].get(key), by_world[hi].get(key)
        if not a or not b:
            continue
        k = math.log(b / a) / math.log(hi / lo)
        vals = ", ".join(f"w{w}: {by_world[w][key]:,.3g}" for w in worlds if by_world[w].get(key) is not None)
        timed = label.endswith("(s)") or "(s," in label
        verdict = ("not judged: under 0.5 s, scheduling noise" if timed and b < 0.5 else
                   "**yes**" if k > 1.25 else "no")
        rows.append((label, vals, f"{k:.2f}", verdict))
    return rows
