"""``mom-plan``: every valid training layout of a model on a cluster, with predicted per-GPU
memory, all-to-all traffic and step time, and the layout to use.

    mom-plan CONFIG --cluster CLUSTER.yaml [--routing RUN_DIR] [--set section.key=value]
             [--mfu 0.35] [--limit N] [--ep N] [--markdown]

CONFIG is a training config (configs/*.yaml); CLUSTER a cluster description (see
configs/clusters/). ``--routing RUN_DIR`` uses the module loads measured in that run's
``metrics.jsonl`` instead of uniform routing. Bad input: one line ``mom-plan: error: ...``, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from mom_dist.exit_codes import BAD_INPUT, FINISHED


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mom-plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("config", help="training config YAML (e.g. configs/mom-small.yaml)")
    ap.add_argument("--cluster", required=True, help="cluster description YAML (e.g. configs/clusters/h100-2x8.yaml)")
    ap.add_argument("--routing", metavar="RUN_DIR", help="use the routing measured in this run's metrics.jsonl")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. train.global_batch_size=1024 (repeatable)")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed share of peak FLOP/s reached (default 0.35)")
    ap.add_argument("--limit", type=int, default=None, help="show the N fastest layouts (0: all; default all)")
    ap.add_argument("--ep", type=int, default=None, help="list only layouts with this ep_size (the recommendation "
                    "still considers all)")
    ap.add_argument("--markdown", action="store_true", help="markdown table (for docs)")
    args = ap.parse_args(argv)

    from mom_dist.config import load_config
    from mom_dist.plan import Assumptions, load_cluster, plan_layouts, read_routing
    from mom_dist.plan.table import render

    try:
        if not 0 < args.mfu <= 1:
            raise ValueError(f"--mfu {args.mfu} must be in (0, 1], e.g. 0.35")
        if not os.path.isfile(args.config):
            raise ValueError(f"config file '{args.config}' does not exist; pass one under configs/ "
                             "(e.g. configs/mom-small.yaml)")
        cfg = load_config(args.config, args.overrides)
        cluster = load_cluster(args.cluster)
        profile = read_routing(args.routing, cfg.model) if args.routing else None
        plan = plan_layouts(cfg, cluster, profile, Assumptions(mfu=args.mfu))
    except (ValueError, TypeError) as err:
        print(f"mom-plan: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return BAD_INPUT
    if not plan.layouts:
        print(f"mom-plan: error: {no_layout_message(cfg, cluster.world, plan.rejected)}", file=sys.stderr)
        return BAD_INPUT
    print(render(plan, os.path.basename(args.config), markdown=args.markdown, limit=args.limit or None, ep=args.ep))
    return FINISHED


def no_layout_message(cfg, world: int, rejected: dict) -> str:
    gb = cfg.train.global_batch_size
    if "global batch not a multiple of micro-batch x world" in rejected:
        options = sorted({max(world, gb // world * world), -(-gb // world) * world})
        return (f"no valid layout on {world} GPUs: train.global_batch_size={gb} is not a multiple of the "
                f"{world} GPUs' micro-batches; plan with --set train.global_batch_size="
                f"{' or '.join(map(str, options))} (or another multiple of {world})")
    return f"no valid layout on {world} GPUs: " + "; ".join(rejected.values())


if __name__ == "__main__":
    sys.exit(main())
