"""``mom-train``: train a MoM (one process, torchrun, deepspeed or mpirun launch).

    mom-train --config configs/tiny.yaml [--set train.steps=100 --set parallel.ep_size=2 ...]

Every config field can be overridden with ``--set section.key=value`` (YAML values).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mom-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set model.n_steps=4 (repeatable)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)

    from mom_dist.config import load_config
    from mom_dist.parallel.runtime import LaunchError, shutdown

    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"mom-train: config error: {e}", file=sys.stderr)
        return 2
    from mom_dist.train.trainer import train

    from mom_dist.exit_codes import DIVERGED, TrainingDiverged

    try:
        result = train(cfg)
    except (ValueError, LaunchError) as e:
        print(f"mom-train: error: {e}", file=sys.stderr)
        shutdown(2)
    except TrainingDiverged as e:
        print(f"mom-train: error: {e}", file=sys.stderr)
        shutdown(DIVERGED)
    print(f"mom-train: done: {result.steps_done} steps, final loss {result.final_loss:.4f}"
          + (f", validation perplexity {result.valid_ppl:.2f}" if result.valid_ppl else ""), flush=True)
    shutdown(0)


if __name__ == "__main__":
    sys.exit(main())
