"""All-to-all bytes of expert parallelism, under uniform routing or a run's measured routing.

Byte accounting follows ``mom_dist.parallel.all_to_all`` exactly. Per source rank and plan
(one plan per attention sub-layer, reused by its output projection; one per FFN), counting
its tokens' trips out and their results' trips back (sent by the expert ranks), so that the
mean over ranks is what one rank sends:

- dropless: U = distinct (token, remote EP rank) pairs, Wp = picks of modules on remote
  ranks (SKIP never travels). Payload elements: attention U x 6d (x out, mixed QKV back,
  attention output out, projection back) + Wp pick weights (+ Wp more if ``qkv_weighted``);
  FFN U x 2d + Wp. Control: the split counts (E - 1) x (1 + N/E) int64 and two int32 per
  remote pick (module, row). Backward sends the payload again (reverse all-to-alls), not the
  control; activation checkpointing does not repeat them.
- capacity: fixed buffers of N/E x capacity rows to each other rank (capacity =
  ceil(cf x T x K / N)), attention 6d and FFN 2d elements per row, plus a 1-byte valid mask
  per row, whatever the routing.

``plan_bytes`` is exact given (U, Wp): summed over ranks it equals the dispatcher's measured
bytes (``tests/plan/test_plan_measured.py``).
``RoutingProfile`` estimates U and Wp from per-module pick shares (uniform, or the load
histograms of a run's ``metrics.jsonl``), assuming a token's EP rank is independent of its
picks and, for K > 1, that its K distinct picks are drawn from the shares without replacement.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mom_dist.model.config import ModelConfig
from mom_dist.model.dispatch import capacity_for

A2A_CALLS_PER_STEP = {"attn": 12, "ffn": 8}  # fwd + bwd all_to_all calls per routing step (dropless)


@dataclass
class PlanBytes:
    payload: float  # forward payload bytes sent to other ranks (backward sends as much again)
    control: float  # forward integer/bool bytes (split counts, metadata, valid masks)


def plan_bytes(pool: str, *, u: float, wp: float, d: int, ep: int, n_modules: int, act_bytes: int,
               qkv_weighted: bool = False) -> PlanBytes:
    """Dropless bytes one source rank sends for one plan, given U and Wp (see module docstring)."""
    if ep == 1:
        return PlanBytes(0.0, 0.0)
    if pool == "attn":
        elems = u * 6 * d + wp * (2 if qkv_weighted else 1)
    else:
        elems = u * 2 * d + wp
    control = (ep - 1) * (1 + n_modules // ep) * 8 + wp * 2 * 4
    return PlanBytes(elems * act_bytes, control)


def capacity_plan_bytes(pool: str, *, tokens: int, top_k: int, d: int, ep: int, n_modules: int,
                        capacity_factor: float, act_bytes: int) -> PlanBytes:
    if ep == 1:
        return PlanBytes(0.0, 0.0)
    cap = capacity_for(tokens, top_k, n_modules, capacity_factor)
    rows = (ep - 1) * (n_modules // ep) * cap
    return PlanBytes(rows * (6 if pool == "attn" else 2) * d * act_bytes, float(rows))


@dataclass
class StepShares:
    """Pick shares of one router at one routing step: per module, and SKIP (per pick slot)."""

    pool: str
    modules: list[float]  # share of picks per module; sums to 1 - skip
    skip: float

    def rank_shares(self, ep: int) -> list[float]:
        n_local = len(self.modules) // ep
        return [sum(self.modules[r * n_local:(r + 1) * n_local]) for r in range(ep)]

    def u_wp(self, tokens: int, top_k: int, ep: int, n_choices: int | None = None) -> tuple[float, float]:
        """Expected (U, Wp) per source rank for ``tokens`` tokens.

        A token's K picks are distinct classes among ``n_choices`` (modules + SKIP classes the
        router may pick). Rank r, holding a share Q_r of the picks, gets none of a token's K
        picks with probability prod_k (1 - Q_r - k/n) / (1 - k/n), drawing without
        replacement: exact for uniform routing, an approximation otherwise.
        """
        remote = (ep - 1) / ep  # a rank's own modules are 1/EP of every pick's destinations
        wp = tokens * top_k * (1.0 - self.skip) * remote
        if top_k == 1:
            return wp, wp
        n = n_choices or len(self.modules)
        reach = 0.0
        for q in self.rank_shares(ep):
            miss = 1.0
            for k in range(top_k):
                miss *= max(0.0, 1.0 - q - k / n) / (1.0 - k / n) if k < n else 0.0
            reach += 1.0 - miss
        return tokens * reach * remote, wp

    def imbalance(self, ep: int) -> float:
        """Busiest EP rank's share of the picks over the mean share (1 = balanced)."""
        shares = self.rank_shares(ep)
        mean = sum(shares) / ep
        return max(shares) / mean if mean > 0 else 1.0


@dataclass
class RoutingProfile:
    source: str  # "uniform" or "RUN_DIR step N"
    steps: list[StepShares]  # one per (chunk, routing step, pool) actually measured

    @classmethod
    def uniform(cls, m: ModelConfig) -> "RoutingProfile":
        steps = []
        for _ in range(m.n_chunks * m.n_steps):
            for pool, n in (("attn", m.n_attn_modules), ("ffn", m.n_ffn_modules)):
                steps.append(StepShares(pool, [1.0 / n] * n, 0.0))
        return cls("uniform over the modules, no SKIP", steps)

    def skip_rate(self, pool: str) -> float:
        rates = [s.skip for s in self.steps if s.pool == pool]
        return sum(rates) / len(rates) if rates else 0.0

    def imbalance(self, ep: int) -> float:
        """Pick-weighted mean over routing steps of the busiest rank's excess load."""
        num = den = 0.0
        for s in self.steps:
            w = 1.0 - s.skip
            num, den = num + w * s.imbalance(ep), den + w
        return num / den if den else 1.0


def a2a_bytes_per_microbatch(m: ModelConfig, profile: RoutingProfile, *, tokens: int, ep: int,
                             precision: str, dispatcher: str = "dropless",
                             capacity_factor: float = 1.25) -> PlanBytes:
    """Forward bytes one rank sends per micro-batch of ``tokens`` tokens, over all plans."""
    act = 2 if precision == "bf16" else 4
    total = PlanBytes(0.0, 0.0)
    # The profile may hold fewer steps than the model (e.g. a shorter measured run): scale.
    n_plans = {"attn": m.n_chunks * m.n_steps, "ffn": m.n_chunks * m.n_steps}
    for pool, n_modules, router in (("attn", m.n_attn_modules, m.attn_router), ("ffn", m.n_ffn_modules, m.ffn_router)):
        steps = [s for s in profile.steps if s.pool == pool]
        scale = n_plans[pool] / len(steps)
        for s in steps:
            if dispatcher == "capacity":
                b = capacity_plan_bytes(pool, tokens=tokens, top_k=router.top_k, d=m.d_model, ep=ep,
                                        n_modules=n_modules, capacity_factor=capacity_factor, act_bytes=act)
            else:
                skip_classes = m.n_classes - n_modules if router.allow_skip else 0
                u, wp = s.u_wp(tokens, router.top_k, ep, n_modules + (skip_classes if s.skip > 0 else 0))
                b = plan_bytes(pool, u=u, wp=wp, d=m.d_model, ep=ep, n_modules=n_modules, act_bytes=act,
                               qkv_weighted=m.qkv_weighted)
            total.payload += scale * b.payload
            total.control += scale * b.control
    return total


# ------------------------------------------------------------------ measured routing
def read_routing(run_dir: str, m: ModelConfig, label: str | None = None) -> RoutingProfile:
    """Pick shares from the newest ``routing`` record of ``RUN_DIR/metrics.jsonl``.

    Reads per (chunk, step, pool) entries with a ``load`` list (picks per module) and a
    ``skip_rate``; other keys (more detail a newer trainer writes) are ignored. Errors start
    with ``label`` (default ``--routing RUN_DIR``).
    """
    where = label or f"--routing {run_dir}"
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{where}: no metrics.jsonl there; pass the out_dir of a training run "
                         "(one that reached train.telemetry_interval)")
    last = None
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run
            if isinstance(rec, dict) and rec.get("kind") == "routing":
                last = rec
    if last is None:
        raise ValueError(f"{where}: metrics.jsonl holds no routing telemetry yet; train past "
                         "train.telemetry_interval steps first")
    entries = last.get("detail", last.get("per_step"))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: the routing record at step {last.get('step')} has no per-step "
                         "'detail' list")
    steps = []
    for e in entries:
        pool, load = e.get("pool"), e.get("load")
        n = {"attn": m.n_attn_modules, "ffn": m.n_ffn_modules}.get(pool)
        if n is None or not isinstance(load, list):
            raise ValueError(f"{where}: unreadable routing entry {str(e)[:80]}")
        if len(load) != n:
            raise ValueError(f"{where}: the run had {len(load)} {pool} modules per chunk but the config "
                             f"has {n}; plan with the run's own config")
        skip = float(e.get("skip_rate", 0.0))
        picks = sum(load)
        shares = [x / picks * (1.0 - skip) for x in load] if picks else [(1.0 - skip) / n] * n
        steps.append(StepShares(pool, shares, skip))
    for pool in ("attn", "ffn"):
        if not any(s.pool == pool for s in steps):
            raise ValueError(f"{where}: no {pool} entries in the routing record")
    return RoutingProfile(f"{run_dir} (routing telemetry of step {last.get('step')})", steps)
