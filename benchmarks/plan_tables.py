"""``mom-plan`` for MoM-small/medium/large on 8 to 512 GPUs (H100/H200-like clusters); prints markdown.

    python benchmarks/plan_tables.py > /tmp/plan.md      # benchmarks/results/plan.md holds the latest

For each preset (configs/mom-{small,medium,large}.yaml, unchanged) and each example cluster in
configs/clusters/: one summary row (the recommended layout and its predictions), then the full
``mom-plan`` output, fastest layouts first, for the cases where expert parallelism is possible
(EP must divide the world and both module pools: 9 modules allow EP 3 and 9, 15 allow 3, 5, 15).
Everything here is the planner's prediction (see docs/usage.md for which figures are checked
against measured runs); nothing is timed.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mom_dist.config import load_config  # noqa: E402
from mom_dist.plan import load_cluster, plan_layouts  # noqa: E402
from mom_dist.plan.table import GIB, MIB, render  # noqa: E402

MODELS = ["mom-small", "mom-medium", "mom-large"]
CLUSTERS = ["h100-1x8", "h100-2x8", "h100-3x8", "h100-8x8", "h200-9x8", "h100-15x8", "h200-16x8", "h100-64x8",
            "h200-64x8"]
DETAIL = [("mom-small", "h100-3x8"), ("mom-medium", "h200-9x8"), ("mom-large", "h100-15x8"),
          ("mom-large", "h100-64x8")]


def global_batch(world: int) -> int:
    """The presets' 512 sequences where the world divides it; otherwise the nearest multiple of
    4 x world at or above 480 (the trainer needs global batch = micro x world x accumulation)."""
    if 512 % world == 0:
        return 512
    step = 4 * world
    return max(step, -(-480 // step) * step)


def summary(limit: int) -> str:
    rows = ["| model | cluster | GPUs | global batch | valid layouts | fit | EP options | recommended (EP / ZeRO / micro / AC) | "
            "GiB per GPU | step s | tokens/s | a2a MiB/step/GPU | fastest EP>1 layout: step s, GiB |",
            "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|"]
    details = []
    for name in MODELS:
        cfg_path = os.path.join(ROOT, "configs", f"{name}.yaml")
        for cl in CLUSTERS:
            cluster = load_cluster(os.path.join(ROOT, "configs", "clusters", f"{cl}.yaml"))
            gb = global_batch(cluster.world)
            cfg = load_config(cfg_path, [f"train.global_batch_size={gb}"])
            plan = plan_layouts(cfg, cluster)
            best = plan.recommended
            eps = sorted({lay.ep for lay in plan.layouts})
            ep_gt1 = [lay for lay in plan.layouts if lay.ep > 1 and lay.fits]
            alt = f"EP {ep_gt1[0].ep}: {ep_gt1[0].step_s:.3f}, {ep_gt1[0].memory.total / GIB:.1f}" if ep_gt1 else "-"
            if best is None:
                rows.append(f"| {name} | {cluster.label()} | {cluster.world} | {gb} | {len(plan.layouts)} | 0 | "
                            f"{eps} | none fits | - | - | - | - | {alt} |")
            else:
                rows.append(
                    f"| {name} | {cluster.label()} | {cluster.world} | {gb} | {len(plan.layouts)} | "
                    f"{sum(lay.fits for lay in plan.layouts)} | {', '.join(map(str, eps))} | "
                    f"{best.ep} / {best.zero} / {best.micro_batch} / {'on' if best.checkpointing else 'off'} | "
                    f"{best.memory.total / GIB:.1f} | {best.step_s:.3f} | {plan.tokens_per_s(best):,.0f} | "
                    f"{best.a2a_bytes_step / MIB:,.1f} | {alt} |")
            if (name, cl) in DETAIL:
                details.append(f"### {name} on {cluster.label()}\n\n"
                               f"`mom-plan configs/{name}.yaml --cluster configs/clusters/{cl}.yaml "
                               f"--set train.global_batch_size={gb} --markdown --limit {limit}`\n\n{render(plan, f'{name}.yaml', markdown=True, limit=limit)}")
    return "\n".join(rows) + "\n\n" + "\n\n".join(details)


def per_ep(name: str, cluster_name: str, overrides: list[str]) -> str:
    """The fastest fitting layout for each EP: where expert parallelism stays inside a node."""
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), overrides)
    cluster = load_cluster(os.path.join(ROOT, "configs", "clusters", f"{cluster_name}.yaml"))
    plan = plan_layouts(cfg, cluster)
    rows = [f"`mom-plan configs/{name}.yaml --cluster configs/clusters/{cluster_name}.yaml "
            + " ".join(f"--set {o}" for o in overrides) + " --ep N`: the fastest layout that fits, per EP\n",
            "| EP | ZeRO | micro | AC | params GiB | total GiB | a2a MiB/step | grad MiB/step | compute s | a2a s | "
            "grad s | step s | tokens/s |", "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ep in sorted({lay.ep for lay in plan.layouts}):
        lay = next(x for x in plan.layouts if x.ep == ep and x.fits)
        rows.append(f"| {ep} | {lay.zero} | {lay.micro_batch} | {'on' if lay.checkpointing else 'off'} | "
                    f"{lay.memory.params / GIB:.2f} | {lay.memory.total / GIB:.1f} | {lay.a2a_bytes_step / MIB:,.0f} | "
                    f"{lay.grad_bytes_step / MIB:,.0f} | {lay.compute_s:.3f} | {lay.a2a_s:.3f} | {lay.grad_s:.3f} | "
                    f"{lay.step_s:.3f} | {plan.tokens_per_s(lay):,.0f} |")
    best = plan.recommended
    rows.append(f"\nRecommended: EP {best.ep}, ZeRO {best.zero}, micro-batch {best.micro_batch}.")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=12, help="layouts shown in each detailed table")
    args = ap.parse_args()
    print("## Recommended layout per model and cluster (uniform routing, default assumptions)\n")
    print("Global batch 512 x 1,024 tokens (the presets) where the world divides 512, else the nearest "
          "multiple of 4 x world at or above 480. 'fastest EP>1 layout' is the best layout with expert "
          "parallelism, for comparison.\n")
    print(summary(args.limit))
    print("\n## Pools of 16 modules: expert parallelism inside a node\n")
    print("The presets' 9 and 15 modules keep EP groups off power-of-two nodes. With 16 attention and 16 FFN "
          "modules per chunk (mom-large otherwise), EP 2, 4 and 8 stay inside an 8-GPU node and "
          "EP 16+ crosses nodes:\n")
    print(per_ep("mom-large", "h100-8x8", ["model.n_attn_modules=16", "model.n_ffn_modules=16"]))


if __name__ == "__main__":
    main()
