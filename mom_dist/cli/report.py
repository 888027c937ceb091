"""``mom-report``: figures and an HTML page from a run directory.

    mom-report RUN_DIR [-o OUT_DIR] [--steps 100,1000,5000]

Reads RUN_DIR/metrics.jsonl (and config.json); writes OUT_DIR (default RUN_DIR/report)/
index.html and one PNG per figure. Exit 0 when everything was drawn, 2 (one line
``mom-report: error: ...``) when the run directory is unusable or holds no routing telemetry
(the figures that can be drawn are written first).
"""

from __future__ import annotations

import argparse
import os
import sys

from mom_dist.exit_codes import BAD_INPUT, FINISHED


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: expected comma-separated step numbers, e.g. 100,1000")
    if not steps:
        raise argparse.ArgumentTypeError("--steps is empty: give step numbers, e.g. 100,1000")
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mom-report", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", metavar="RUN_DIR", help="a run's train.out_dir")
    ap.add_argument("-o", "--out", default=None, help="output directory (default: RUN_DIR/report)")
    ap.add_argument("--steps", type=_steps, default=None,
                    help="training steps for the module-load heatmaps (default: 4 spread over the run)")
    args = ap.parse_args(argv)

    from mom_dist.report.page import build_report
    from mom_dist.report.run_data import ReportError, load_run

    def fail(msg: str) -> int:
        print(f"mom-report: error: {msg}", file=sys.stderr)
        return BAD_INPUT

    try:
        run = load_run(args.run_dir)
    except ReportError as e:
        return fail(str(e))
    out = args.out or os.path.join(args.run_dir, "report")
    try:
        manifest = build_report(run, out, args.steps)
    except OSError as e:
        return fail(f"cannot write the report to {out} ({e.strerror}); pass a writable -o OUT_DIR")
    print(f"mom-report: {len(manifest['figures'])} figures -> {manifest['html']}")
    if not run.routing:
        return fail(f"{args.run_dir}/metrics.jsonl has no routing telemetry (kind: routing) records: routing "
                    f"figures not drawn; train past train.telemetry_interval steps (training figures are in {out})")
    return FINISHED


if __name__ == "__main__":
    sys.exit(main())
