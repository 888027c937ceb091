"""``mom-plan``: every valid training layout of a model on a cluster, with predicted per-GPU
memory, all-to-all traffic and step time, and the layout to use; or, with ``--compare``, the
efficiency table of several models (parameters, depth, FLOPs, memory).

    mom-plan CONFIG --cluster CLUSTER.yaml [--routing RUN_DIR] [--set section.key=value]
             [--mfu 0.35] [--limit N] [--ep N] [--markdown]
    mom-plan --compare CONFIG_OR_RUN_DIR CONFIG_OR_RUN_DIR ... [--batch B] [--seq-len S]
             [--checkpointing config|on|off] [--set section.key=value] [--markdown | --json]

CONFIG is a training config (configs/*.yaml); CLUSTER a cluster description (see
configs/clusters/). ``--routing RUN_DIR`` uses the module loads measured in that run's
``metrics.jsonl`` instead of uniform routing. A ``--compare`` entry may be a training run's
out_dir: its config.json, with SKIP as its routing telemetry measured. Bad input: one line
``mom-plan: error: ...``, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from mom_dist.exit_codes import BAD_INPUT, FINISHED


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mom-plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("config", nargs="?", help="training config YAML (e.g. configs/mom-small.yaml)")
    ap.add_argument("--cluster", help="cluster description YAML (e.g. configs/clusters/h100-2x8.yaml)")
    ap.add_argument("--routing", metavar="RUN_DIR", help="use the routing measured in this run's metrics.jsonl")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. train.global_batch_size=1024 (repeatable; with --compare: every "
                    "compared config)")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed share of peak FLOP/s reached (default 0.35)")
    ap.add_argument("--limit", type=int, default=None, help="show the N fastest layouts (0: all; default all)")
    ap.add_argument("--ep", type=int, default=None, help="list only layouts with this ep_size (the recommendation "
                    "still considers all)")
    ap.add_argument("--markdown", action="store_true", help="markdown table (for docs)")
    ap.add_argument("--compare", nargs="+", metavar="CONFIG", help="efficiency table of these configs (YAML files "
                    "or training run directories), first one the baseline")
    ap.add_argument("--batch", type=int, default=None, help="--compare: sequences per forward (default: the first "
                    "config's train.micro_batch_size)")
    ap.add_argument("--seq-len", type=int, default=None, help="--compare: tokens per sequence (default: the first "
                    "config's train.seq_len)")
    ap.add_argument("--checkpointing", choices=("config", "on", "off"), default="config",
                    help="--compare: activation checkpointing as each config sets it (default), or on/off for all")
    ap.add_argument("--json", action="store_true", help="--compare: machine-readable JSON")
    args = ap.parse_args(argv)
    try:
        text = run_compare(args) if args.compare is not None else run_layouts(args)
    except (ValueError, TypeError) as err:
        print(f"mom-plan: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return BAD_INPUT
    print(text)
    return FINISHED


def run_compare(args) -> str:
    from mom_dist.plan.compare import compare, load_entry, render

    if args.config is not None:
        raise ValueError(f"give every compared config after --compare (got '{args.config}' before it)")
    misplaced = [flag for flag, value in (("--cluster", args.cluster), ("--routing", args.routing),
                                          ("--limit", args.limit), ("--ep", args.ep)) if value is not None]
    if misplaced:
        raise ValueError(f"{misplaced[0]} plans layouts and does not apply to --compare; for SKIP as a run measured "
                         "it, pass the run's out_dir as a compared entry (mom-plan --compare A.yaml runs/B)")
    if len(args.compare) < 2:
        raise ValueError(f"--compare needs at least two configs (got {len(args.compare)}); to plan one model's "
                         "layouts use mom-plan CONFIG --cluster CLUSTER.yaml")
    if args.json and args.markdown:
        raise ValueError("--json and --markdown exclude each other; pick one")
    for flag, value in (("--batch", args.batch), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be a whole number >= 1")
    entries = [load_entry(path, args.overrides) for path in args.compare]
    first = entries[0][1].train
    batch = args.batch or first.micro_batch_size
    seq = args.seq_len or first.seq_len
    ac = {"config": None, "on": True, "off": False}[args.checkpointing]
    rows = compare(entries, batch, seq, ac)
    return render(rows, "json" if args.json else "markdown" if args.markdown else "text")


def run_layouts(args) -> str:
    from mom_dist.config import load_config
    from mom_dist.plan import Assumptions, load_cluster, plan_layouts, read_routing
    from mom_dist.plan.table import render

    if args.config is None:
        raise ValueError("give a config to plan (mom-plan CONFIG --cluster CLUSTER.yaml), or compare models with "
                         "--compare CONFIG CONFIG ...")
    if args.cluster is None:
        raise ValueError("--cluster CLUSTER.yaml is required to plan layouts (examples in configs/clusters/); "
                         "to compare models instead use --compare CONFIG CONFIG ...")
    for flag in ("batch", "seq_len", "json"):
        if getattr(args, flag):
            raise ValueError(f"--{flag.replace('_', '-')} applies to --compare only")
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu {args.mfu} must be in (0, 1], e.g. 0.35")
    if not os.path.isfile(args.config):
        raise ValueError(f"config file '{args.config}' does not exist; pass one under configs/ "
                         "(e.g. configs/mom-small.yaml)")
    cfg = load_config(args.config, args.overrides)
    cluster = load_cluster(args.cluster)
    profile = read_routing(args.routing, cfg.model) if args.routing else None
    plan = plan_layouts(cfg, cluster, profile, Assumptions(mfu=args.mfu))
    if not plan.layouts:
        raise ValueError(no_layout_message(cfg, cluster.world, plan.rejected))
    return render(plan, os.path.basename(args.config), markdown=args.markdown, limit=args.limit or None, ep=args.ep)


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
