"""Scale rehearsal: a tiny MoM (16 attention + 16 FFN modules) at world 16 and 32 on this one host,
as 4 SLURM nodes (real slurmctld + 4 slurmd, tests/launch/cluster_harness.py) and through
DeepSpeed's multi-node launcher, with our own launchers and commands (``sbatch
launchers/slurm.sbatch``, ``launchers/deepspeed_multinode.sh``, ``mom-train``; the planner
``mom-plan`` runs). Every row is a check that passes or fails on what the runs left behind:

  losses      every step's loss equals the 1-process run of the same config (rel 1e-5)
  a2a bytes   capacity dispatch: each rank's all-to-all bytes in the routing telemetry equal the
              planner's prediction byte for byte; dropless: the planner's estimate from the run's
              own routing telemetry is within 10% (dropless bytes depend on the routing)
  memory      each rank's parameters + fp32 master + AdamW states equal the planner's
              (DeepSpeed padding aside); peak RSS reported
  resume      train at the largest world, continue at 8 (quick: 2), finish as 1 process: the
              last steps' losses and the final weights equal the uninterrupted 1-process run
  killed rank a SIGKILLed rank at the largest world is named in the job's output within 60 s

and it records wall time, per-rank start-up (process start, imports, rendezvous, groups, engine,
first step, in seconds from the launch), collective counts per rank (set-up, per step), and names
what grows faster than linearly with the world size. Results: benchmarks/results/scale_rehearsal.md.

    python benchmarks/scale_rehearsal.py                 # world 16 and 32: about 30 min on 2 cores
    python benchmarks/scale_rehearsal.py --quick         # world 8 (4 nodes x 2), one layout: ~5 min
    python benchmarks/scale_rehearsal.py --layouts slurm:w32:ep16:z2:capacity --no-resume --no-kill

A layout is LAUNCHER:wWORLD:epEP:zZERO[:capacity] (LAUNCHER slurm or deepspeed; always 4 nodes x
WORLD/4 ranks). Needs root (it installs SLURM with apt if missing, starts the daemons, adds host
names to /etc/hosts, and stops and removes all of it at the end). Exit 0: every row passed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

PROG = "scale_rehearsal.py"
NODES = 4
MODULES = 16
LAYOUT_RE = re.compile(r"^(slurm|deepspeed):w(\d+):ep(\d+):z([012])(:capacity)?$")
FULL = ["slurm:w32:ep8:z1", "slurm:w16:ep16:z2:capacity", "slurm:w32:ep16:z2:capacity", "deepspeed:w32:ep4:z2",
        "slurm:w16:ep4:z1"]
QUICK = ["slurm:w8:ep4:z2:capacity"]


class BadInput(ValueError):
    pass


def parse_layout(text: str) -> dict:
    m = LAYOUT_RE.match(text.strip())
    if not m:
        raise BadInput(f"unknown layout '{text}': write LAUNCHER:wWORLD:epEP:zZERO[:capacity] with LAUNCHER slurm or "
                       "deepspeed, ZERO 0-2, e.g. slurm:w32:ep8:z1")
    launcher, world, ep, zero, cap = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5)
    if world < NODES or world % NODES:
        raise BadInput(f"layout '{text}': world {world} does not split over {NODES} nodes; use a multiple of {NODES} "
                       "(e.g. w16, w32)")
    if ep < 1 or world % ep or MODULES % ep:
        raise BadInput(f"layout '{text}': EP {ep} must divide the world ({world}) and the {MODULES} modules per pool "
                       "(1, 2, 4, 8 or 16)")
    return dict(launcher=launcher, world=world, ep=ep, zero=zero, dispatcher="capacity" if cap else "dropless",
                name=f"{launcher}-w{world}-ep{ep}-z{zero}" + ("-cap" if cap else ""))


def parse_args(argv):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="world 8 (4 nodes x 2), one layout, resume 8 -> 2 -> 1")
    ap.add_argument("--layouts", help=f"comma-separated layouts (default: {','.join(FULL)})")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4; >= 3)")
    ap.add_argument("--no-resume", action="store_true", help="skip the elastic resume")
    ap.add_argument("--no-kill", action="store_true", help="skip the killed-rank check")
    ap.add_argument("--results", help="markdown file to write (default: benchmarks/results/scale_rehearsal.md; "
                    "--quick: none)")
    ap.add_argument("--work", help="keep every run's outputs and logs here (default: a temporary directory, "
                    "removed when every row passed)")
    args = ap.parse_args(argv)
    specs = args.layouts.split(",") if args.layouts else (QUICK if args.quick else FULL)
    args.layout_list = [parse_layout(s) for s in specs if s.strip()]
    if not args.layout_list:
        raise BadInput("--layouts lists no layout; e.g. --layouts slurm:w32:ep8:z1")
    if args.steps < 3:
        raise BadInput(f"--steps {args.steps}: the resume needs at least 3 steps (one per leg)")
    if args.results is None and not args.quick:
        args.results = os.path.join(ROOT, "benchmarks", "results", "scale_rehearsal.md")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except BadInput as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(f"{PROG}: error: needs root (it starts SLURM daemons and edits /etc/hosts); run it as root on a "
              "machine of its own", file=sys.stderr)
        return 1
    from tests.launch.cluster_harness import Slurm, Unavailable

    def stop(signum, frame):  # `timeout`/`kill`: unwind, so the daemons and jobs are stopped below
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)

    biggest = max(x["world"] for x in args.layout_list)
    try:
        slurm = Slurm(nodes=NODES, cpus=max(2, biggest // NODES), alias="momrehearse")
    except Unavailable as e:
        print(f"{PROG}: error: SLURM cannot start here: {e}", file=sys.stderr)
        return 1
    work = args.work or tempfile.mkdtemp(prefix="mom-rehearsal-")
    os.makedirs(work, exist_ok=True)
    try:
        report = Rehearsal(args, argv, slurm, work).run()
    except KeyboardInterrupt as e:
        slurm.stop()
        print(f"{PROG}: interrupted ({e or 'Ctrl-C'}): SLURM stopped; what was measured is in "
              f"{args.results or work}", file=sys.stderr)
        return 130
    finally:
        slurm.stop()  # idempotent: the daemons are stopped once
    report.print()
    if args.results:
        print(f"{PROG}: results written to {args.results}")
    ok = report.all_passed()
    if ok and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"{PROG}: outputs and logs in {work}")
    return 0 if ok else 1


class Rehearsal:
    def __init__(self, args, argv, slurm, work):
        from _rehearsal_report import Report

        self.args, self.slurm, self.work = args, slurm, work
        self.worlds = sorted({x["world"] for x in args.layout_list})
        self.batch = math.lcm(*self.worlds)
        self.mid = 8 if max(self.worlds) >= 16 else 2  # the resume's middle world
        self.report = Report(args, argv, self.batch, args.results)
        self.refs = {}

    def new_run(self, name, launcher, world, ep, zero, dispatcher, *extra):
        from _rehearsal_runs import Run, model_set

        d = os.path.join(self.work, name)
        os.makedirs(d, exist_ok=True)
        return Run(name, launcher, world, NODES if launcher != "local" and world >= NODES else max(1, min(world, NODES)),
                   ep, zero, dispatcher, model_set(self.batch, self.args.steps) + list(extra),
                   os.path.join(d, "out"), os.path.join(d, "stats"))

    def launch(self, run):
        from _rehearsal_runs import run_deepspeed, run_local, run_slurm

        print(f"[rehearsal] {run.name}: {run.world} ranks ({run.launcher}) ...", flush=True)
        try:
            if run.launcher == "local":
                run_local(run)
            elif run.launcher == "slurm":
                run_slurm(self.slurm, run)
            else:
                run_deepspeed(run, self.slurm.nodes)
        except (RuntimeError, AssertionError, OSError, subprocess.TimeoutExpired) as e:  # a failed row, not the end
            run.state, run.rc = f"error: {str(e).splitlines()[0][:300]}", 1
        print(f"[rehearsal] {run.name}: {run.state} in {run.wall:.0f} s", flush=True)
        return run

    def reference(self, dispatcher):
        if dispatcher not in self.refs:
            steps = self.args.steps
            ref = self.launch(self.new_run(f"ref-{dispatcher}", "local", 1, 1, 0, dispatcher,
                                           f"train.save_interval={steps}"))
            if ref.rc != 0:
                raise SystemExit(f"{PROG}: error: the 1-process reference failed; see {ref.log}")
            self.refs[dispatcher] = ref
        return self.refs[dispatcher]

    def run(self):
        args, steps, rep = self.args, self.args.steps, self.report
        first = args.layout_list[0]
        big = max(self.worlds)
        chain = None if args.no_resume else next((x for x in args.layout_list if x["world"] == big), first)
        ordered = ([chain] if chain else []) + [x for x in args.layout_list if x is not chain]
        for spec in ordered:
            ref = self.reference(spec["dispatcher"])
            extra = [f"train.save_interval={steps}"] + (["train.stop_after=2"] if spec is chain else [])
            run = self.launch(self.new_run(spec["name"], spec["launcher"], spec["world"], spec["ep"], spec["zero"],
                                           spec["dispatcher"], *extra))
            rep.add_run(run, ref, upto=2 if spec is chain else steps)
            if spec is chain:
                self.resume(run, ref)
                if not args.no_kill:  # right after the chain: the key rows come first
                    self.kill(spec)
            rep.write()
        if chain is None and not args.no_kill:
            self.kill(first)
        rep.write()
        return rep

    def resume(self, leg1, ref):
        from _rehearsal_checks import losses_match, weights_match

        steps, rep = self.args.steps, self.report
        if leg1.state != "COMPLETED":
            rep.row("resume", f"{leg1.world} -> {self.mid} -> 1", False, f"first leg {leg1.state}; see {leg1.log}")
            return
        ep_mid = min(leg1.ep, self.mid)
        leg2 = self.new_run(f"resume-w{self.mid}", "slurm", self.mid, ep_mid, 2 if leg1.zero != 2 else 1,
                            leg1.dispatcher, f"train.save_interval={steps}", f"train.stop_after={max(1, steps - 3)}")
        leg2.out_dir = leg1.out_dir  # the same run directory: each leg resumes from the previous one's checkpoint
        self.launch(leg2)
        rep.add_figures(leg2)
        leg3 = self.new_run("resume-w1", "local", 1, 1, 0, leg1.dispatcher, f"train.save_interval={steps}")
        leg3.out_dir = leg1.out_dir
        if leg2.state == "COMPLETED":
            self.launch(leg3)
        got = leg1.losses()
        ok_l, why_l = losses_match(got, ref.losses(), range(1, steps + 1))
        ok_w, why_w = (weights_match(leg1.out_dir, ref.out_dir) if leg3.state == "COMPLETED"
                       else (False, f"legs: {leg2.state or 'not run'}, {leg3.state or 'not run'}"))
        text = leg3.text() + leg2.text()
        resharded = ("resharded from world" in text)
        loads = [r["marks"]["checkpoint_load"] - r["marks"]["engine"] for r in leg2.stats()
                 if {"checkpoint_load", "engine"} <= r["marks"].keys()]
        why_w += f"; world {self.mid} loaded the world-{leg1.world} checkpoint in {max(loads):.1f} s" if loads else ""
        rep.row("resume", f"{leg1.world} (EP{leg1.ep} Z{leg1.zero}) -> {self.mid} (EP{ep_mid} Z{leg2.zero}) -> 1",
                ok_l and ok_w and resharded,
                f"losses {why_l}; final weights {why_w}; {'resharded on load' if resharded else 'NO reshard line'}")

    def kill(self, spec):
        from _rehearsal_runs import killed_rank_named

        world = spec["world"]
        rank = world - 3  # on the last node
        run = self.new_run(f"kill-w{world}", "slurm", world, spec["ep"], 1, spec["dispatcher"], "train.steps=100000",
                           "train.save_interval=0")
        print(f"[rehearsal] {run.name}: SIGKILL rank {rank} after its first step ...", flush=True)
        try:
            res = killed_rank_named(self.slurm, run, rank)
        except RuntimeError as e:
            self.report.row("killed rank", f"w{world} rank {rank}", False, str(e))
            return
        t = res["named_after_s"]
        ok = t is not None and t <= 60 and res["job_state"] == "FAILED"
        self.report.row("killed rank", f"slurm w{world} = {NODES} x {world // NODES}, rank {rank}", ok,
                        (f"named {t:.1f} s after the kill: `{res['line'][:120]}`" if t is not None else
                         "not named within 90 s") + f"; job {res['job_state']}")


if __name__ == "__main__":
    sys.exit(main())
