"""Module removal (``mom-prune``; the paper's claim that a trained MoM keeps its quality without
many of its modules): measure how much the routers use each module on real data, keep the most
used ones of every chunk's pools, and rewrite the weights and config as a smaller, normal MoM.

    found = measure(model, prefix, seq_len=256, batch_size=8, max_batches=16, eod=1)
    kept = choose(found.pools, {"attn": 2, "ffn": 3}, by="usage")
    cfg, state_dict, notes = prune_state(model.cfg, model.state_dict(), kept, found.pools)

Usage of module m of a chunk's pool: its share of the router's picks at a routing step (picks /
(tokens x K)), summed over the chunk's routing steps, over every window of the data. The picks
are counted by the routing telemetry's own counters (``mom_dist.train.telemetry.StepTelemetry``),
so the table reads like the ``load`` of a ``routing`` record. Score (``by="score"``): the mean
router probability of the module's class, summed over the steps.

What pruning does to a router (per chunk, attention and FFN): its output layer keeps the rows
(weights and biases) of the kept modules, in their old order, then its SKIP classes. A router
has max(N_A', N_F') + 1 classes afterwards (spec §4: classes past a router's own pool are SKIP),
so a router whose pool shrank more than the other keeps its SKIP class(es) and gets extra SKIP
classes that must not change anything: a zero weight row and a bias of ``DEAD_BIAS``, so their
probability is exactly 0 (GRU routers get a bias for this: ``model.router_bias`` turns on, every
other bias zero). A router that needs fewer SKIP classes than it had keeps those with the highest
score (the only case where the SKIP probability changes). Top-K is capped at the classes a router
can still pick (its kept modules + its live SKIP classes).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

import torch

from mom_dist.model.config import ModelConfig

POOLS = ("attn", "ffn")
POOL_FIELD = {"attn": "n_attn_modules", "ffn": "n_ffn_modules"}
POOL_WORD = {"attn": "attention", "ffn": "FFN"}
# Bias of a SKIP class added only to fill the new class count: after the router's 1/tau scaling
# (tau <= 1 in practice) it is <= -1e4 below any real score, so exp() gives exactly 0 in fp32 and
# bf16; finite, so weight checks and optimizers treat it as a normal number (biases get no decay).
DEAD_BIAS = -1.0e4
ROUTER_KEY = re.compile(r"^chunks\.(\d+)\.(attn|ffn)_(pool|router)\.(.+)$")


@dataclass
class PoolStats:
    """How one chunk's router used its pool on the measured data."""

    chunk: int
    pool: str  # attn | ffn
    n_modules: int
    usage: list[float]  # per module: share of a step's picks, summed over steps
    score: list[float]  # per router class (modules, then SKIP classes): mean probability, summed over steps
    skip_usage: float  # SKIP's share of the picks, summed over steps
    steps: int = 0


@dataclass
class Measurement:
    loss: float
    perplexity: float
    tokens: int
    pools: dict = field(default_factory=dict)  # (chunk, pool) -> PoolStats


def check_prunable(cfg: ModelConfig) -> None:
    """Refuse models whose modules are layers, not choices (the vanilla GPT-2 case, layer skip)."""
    for name in ("attn_router", "ffn_router"):
        if getattr(cfg, name).schedule == "diagonal":
            raise ValueError(f"the model has no routed modules to remove: model.{name}.schedule is diagonal (step h "
                             "runs module h: a vanilla GPT or layer-skip network, whose modules are its layers); "
                             "mom-prune takes a MoM whose routers choose among modules")


def check_fraction(fraction: float, pool: str) -> None:
    if not 0 < fraction <= 1:  # NaN fails too
        raise ValueError(f"--{pool}-keep {fraction} is not in (0, 1]: it is the fraction of each chunk's "
                         f"{POOL_WORD[pool]} modules to keep (e.g. --{pool}-keep 0.5)")


def keep_count(fraction: float, n_modules: int, pool: str) -> int:
    """floor(fraction x N) modules per chunk; refuses fractions outside (0, 1] and a count of 0."""
    check_fraction(fraction, pool)
    count = math.floor(fraction * n_modules + 1e-9)
    if count < 1:
        raise ValueError(f"--{pool}-keep {fraction} keeps floor({fraction} x {n_modules}) = 0 of the {n_modules} "
                         f"{POOL_WORD[pool]} modules per chunk; a pool needs at least one: use --{pool}-keep >= "
                         f"{1 / n_modules:.3g}")
    return count


def measure(model, prefix: str, *, seq_len: int, batch_size: int, max_batches: int | None, eod: int,
            device: str = "cpu", progress: bool = False) -> Measurement:
    """Loss of ``model`` on the data and its routers' usage of every module (one pass)."""
    from mom_dist.evaluate.perplexity import perplexity
    from mom_dist.parallel.dims import ParallelDims
    from mom_dist.train.telemetry import StepTelemetry

    tel = StepTelemetry(model, ParallelDims(1, 0, 1, None, None, None))  # one process: no all-reduce
    prob_sums: dict[tuple, torch.Tensor] = {}  # (chunk, step, pool) -> (C,) summed probabilities

    def observe(out):
        tel.add(out.routing)
        for r in out.routing:
            key = (r.chunk, r.step, r.pool)
            s = r.probs_TC.detach().double().sum(0)
            prob_sums[key] = prob_sums[key] + s if key in prob_sums else s

    res = perplexity(model, prefix, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches, device=device,
                     eod=eod, progress=progress, observe=observe)
    record = tel.reduce()
    pools: dict[tuple, PoolStats] = {}
    for d in record["detail"]:
        key = (d["chunk"], d["pool"])
        picks = max(d["tokens"] * d["top_k"], 1)
        probs = (prob_sums[(d["chunk"], d["step"], d["pool"])] / max(d["tokens"], 1)).tolist()
        st = pools.setdefault(key, PoolStats(d["chunk"], d["pool"], d["n_modules"], [0.0] * d["n_modules"],
                                             [0.0] * len(probs), 0.0))
        st.usage = [u + n / picks for u, n in zip(st.usage, d["load"])]
        st.score = [s + p for s, p in zip(st.score, probs)]
        st.skip_usage += d["skip"] / picks
        st.steps += 1
    return Measurement(res["loss"], res["perplexity"], res["tokens"], pools)


def choose(pools: dict, counts: dict, by: str) -> dict:
    """(chunk, pool) -> the ids of the modules to keep, ascending: the ``counts[pool]`` most used
    (``by="usage"``; ties go to the higher score, then the lower id) or highest scored."""
    kept = {}
    for key, st in pools.items():
        if by == "usage":
            rank = sorted(range(st.n_modules), key=lambda m: (-st.usage[m], -st.score[m], m))
        else:
            rank = sorted(range(st.n_modules), key=lambda m: (-st.score[m], -st.usage[m], m))
        kept[key] = sorted(rank[:counts[key[1]]])
    return kept


def _router_rows(cfg: ModelConfig, new: ModelConfig, pool: str, kept_ids: list[int], class_score: list[float]):
    """Old class ids that become the new router's classes, and how many dead SKIP classes follow."""
    n_old = getattr(cfg, POOL_FIELD[pool])
    skip_old = list(range(n_old, cfg.n_classes))
    n_skip_new = new.n_classes - len(kept_ids)
    if len(skip_old) > n_skip_new:  # fewer SKIP classes now: keep the most probable ones
        skip_old = sorted(sorted(skip_old, key=lambda c: (-class_score[c], c))[:n_skip_new])
    return kept_ids + skip_old, n_skip_new - len(skip_old)


def _take_rows(v: torch.Tensor, rows: list[int], dead: int, fill: float) -> torch.Tensor:
    out = v[rows].clone()
    if dead:
        pad = v.new_full((dead,) + tuple(v.shape[1:]), fill)
        out = torch.cat([out, pad])
    return out


def prune_state(cfg: ModelConfig, state_dict: dict, kept: dict, pools: dict) -> tuple[ModelConfig, dict, list[str]]:
    """The pruned model's config and weights, and notes on every config change beyond the pool sizes."""
    check_prunable(cfg)
    sizes = {p: {len(ids) for (c, q), ids in kept.items() if q == p} for p in POOLS}
    assert all(len(s) == 1 for s in sizes.values()), f"every chunk keeps the same number of modules: {sizes}"
    new = copy.deepcopy(cfg)
    for p in POOLS:
        setattr(new, POOL_FIELD[p], sizes[p].pop())
    notes: list[str] = []
    plans = {}  # (chunk, pool) -> (rows, dead)
    for (chunk, pool), ids in kept.items():
        plans[(chunk, pool)] = _router_rows(cfg, new, pool, ids, pools[(chunk, pool)].score)
    routers = {"attn": "attn_router", "ffn": "ffn_router"}
    needs_dead_bias = any(dead and getattr(cfg, routers[p]).kind == "gru" and getattr(cfg, routers[p]).allow_skip
                          for (c, p), (rows, dead) in plans.items())
    if needs_dead_bias and not cfg.router_bias:
        new.router_bias = True
        notes.append("model.router_bias: false -> true (the GRU routers' new SKIP classes need a bias to stay unused; "
                     "every other router bias is 0)")
    out = {}
    for k, v in state_dict.items():
        m = ROUTER_KEY.match(k)
        if not m:
            out[k] = v
            continue
        chunk, pool, part, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        rows, dead = plans[(chunk, pool)]
        if part == "pool":
            out[k] = v[kept[(chunk, pool)]].clone()  # stacked (N, ...) tensors: module first
        elif rest == "head.weight":
            out[k] = _take_rows(v, rows, dead, 0.0)
        elif rest in ("head.bias", "head_bias"):
            out[k] = _take_rows(v, rows, dead, DEAD_BIAS)
        else:
            out[k] = v  # the GRU cell / MLP hidden layer see the residual stream, not the classes
    if new.router_bias and not cfg.router_bias:
        for (chunk, pool), (rows, dead) in plans.items():
            if getattr(cfg, routers[pool]).kind == "gru":
                bias = torch.zeros(len(rows) + dead, dtype=out[f"chunks.{chunk}.{pool}_router.head.weight"].dtype)
                bias[len(rows):] = DEAD_BIAS
                out[f"chunks.{chunk}.{pool}_router.head_bias"] = bias
    for pool in POOLS:
        r_old, r_new = getattr(cfg, routers[pool]), getattr(new, routers[pool])
        rows, dead = plans[(0, pool)]
        n_kept = getattr(new, POOL_FIELD[pool])
        live_skip = len(rows) - n_kept if r_old.allow_skip else 0
        if r_old.top_k > n_kept + live_skip:
            r_new.top_k = n_kept + live_skip
            notes.append(f"model.{routers[pool]}.top_k: {r_old.top_k} -> {r_new.top_k} (capped: {n_kept} "
                         f"{POOL_WORD[pool]} module(s){' + ' + str(live_skip) + ' SKIP class(es)' if live_skip else ''} "
                         "left to pick)")
        dropped_skip = (cfg.n_classes - getattr(cfg, POOL_FIELD[pool])) - live_skip
        if r_old.allow_skip and dropped_skip > 0:
            notes.append(f"{routers[pool]}: {dropped_skip} of its SKIP classes removed (the other pool shrank less), "
                         "so its SKIP probability changes")
    new.validate()
    return new, out, notes


def recovery_overrides(old: ModelConfig, new: ModelConfig) -> list[str]:
    """``--set`` overrides that turn the source's training config into the pruned model's."""
    sets = []
    for name in ("n_attn_modules", "n_ffn_modules", "router_bias"):
        if getattr(old, name) != getattr(new, name):
            value = getattr(new, name)
            sets.append(f"model.{name}={str(value).lower() if isinstance(value, bool) else value}")
    for name in ("attn_router", "ffn_router"):
        if getattr(old, name).top_k != getattr(new, name).top_k:
            sets.append(f"model.{name}.top_k={getattr(new, name).top_k}")
    return sets


def table_rows(pools: dict, kept: dict) -> list[dict]:
    """One row per module (and one per pool for SKIP), in model order: what ``choose`` decided from."""
    rows = []
    for (chunk, pool), st in sorted(pools.items(), key=lambda kv: (kv[0][0], POOLS.index(kv[0][1]))):
        for m in range(st.n_modules):
            rows.append({"chunk": chunk, "pool": pool, "module": m, "usage": st.usage[m], "score": st.score[m],
                         "kept": m in kept[(chunk, pool)]})
        rows.append({"chunk": chunk, "pool": pool, "module": "SKIP", "usage": st.skip_usage,
                     "score": sum(st.score[st.n_modules:]), "kept": None})
    return rows


def format_table(rows: list[dict], by: str) -> str:
    lines = [f"{'chunk':>5}  {'pool':<4}  {'module':>6}  {'usage':>7}  {'score':>7}  kept"]
    for r in rows:
        kept = "-" if r["kept"] is None else ("yes" if r["kept"] else "REMOVED")
        lines.append(f"{r['chunk']:>5}  {r['pool']:<4}  {str(r['module']):>6}  {r['usage']:>7.4f}  {r['score']:>7.4f}"
                     f"  {kept}")
    lines.append(f"(usage: share of a routing step's picks, summed over the chunk's steps; score: mean router "
                 f"probability, summed over the steps; modules ranked by {by})")
    return "\n".join(lines)
