"""The scale rehearsal's rows and tables (``benchmarks/scale_rehearsal.py``): PASS/FAIL per check,
start-up and collective figures per run, growth with the world size; printed and written as
markdown (rewritten after every run, so an interrupted rehearsal still leaves what it measured).
"""

from __future__ import annotations

import os

import _machine
from _rehearsal_checks import a2a_bytes, a2a_calls_expected, figures, growth, losses_match, memory


def _what(run) -> str:
    shape = f"{run.nodes} x {run.world // run.nodes}" if run.launcher != "local" else "1 process"
    return f"{run.launcher} w{run.world} = {shape}, EP{run.ep} ZeRO-{run.zero} {run.dispatcher}"


def _span(v) -> str:
    return f"{v[0]:.1f} / {v[1]:.1f} / {v[2]:.1f}" if v else "-"


class Report:
    def __init__(self, args, argv, batch: int, path: str | None):
        self.args, self.path, self.batch = args, path, batch
        self.command = "python benchmarks/scale_rehearsal.py" + "".join(f" {a}" for a in argv)
        self.machine = _machine.describe()
        self.rows: list[tuple[str, str, bool, str]] = []
        self.figs: list[tuple[object, dict]] = []
        self.runs: list = []

    def row(self, check: str, what: str, ok: bool, detail: str) -> None:
        self.rows.append((check, what, ok, detail))
        print(f"[rehearsal] {'PASS' if ok else 'FAIL'} {check}: {what}: {detail}", flush=True)

    def all_passed(self) -> bool:
        return bool(self.rows) and all(ok for _, _, ok, _ in self.rows)

    def add_figures(self, run) -> dict:
        fig = figures(run, run.stats())
        self.figs.append((run, fig))
        return fig

    def add_run(self, run, ref, upto: int) -> None:
        what = _what(run)
        if run.state != "COMPLETED":
            self.row("run", what, False, f"job {run.state}; log {run.log}: {run.text()[-300:]!r}")
            return
        stats = run.stats()
        ok, why = losses_match(run.losses(), ref.losses(), range(1, upto + 1))
        self.row("losses = 1 process", what, ok, why)
        for check, fn in (("a2a bytes = planner", lambda: a2a_bytes(run)), ("memory = planner", lambda: memory(run, stats))):
            try:
                ok, why = fn()
            except Exception as e:  # a check that cannot run is a failed row, never a skipped one
                ok, why = False, f"{type(e).__name__}: {e}"
            self.row(check, what, ok, why)
        fig = self.add_figures(run)
        want = a2a_calls_expected(run)
        got = fig.get("per_step", {}).get("all_to_all_single")
        if want is not None and got is not None:
            self.row("a2a calls = planner", what, got == want, f"{got} all_to_all_single per step per rank, planner "
                     f"{want}")

    # ------------------------------------------------------------------------------------ output
    def markdown(self) -> str:
        worlds = sorted({run.world for run, _ in self.figs})
        L = [f"# Scale rehearsal{' (quick)' if self.args.quick else ''}: world {', '.join(map(str, worlds)) or '-'} "
             "on one host", "",
             f"Command: `{self.command}`  ", f"Machine: {self.machine}", "",
             f"Model: configs/tiny.yaml with 16 attention + 16 FFN modules, d_model 32, 2 routing steps, K=1 "
             f"(attention) / K=2 (FFN), vocab 64, 16 tokens per micro-batch, global batch {self.batch} sequences, "
             f"{self.args.steps} steps, fp32, gloo; every multi-process run is 4 nodes "
             "(this host + 3 more node names) x world/4 ranks. 1-process references: `mom-train`, same config.", "",
             "## Checks", "", "| check | run | result | detail |", "|---|---|---|---|"]
        L += [f"| {c} | {w} | {'PASS' if ok else '**FAIL**'} | {d.replace('|', '/')} |" for c, w, ok, d in self.rows]
        L += ["", "## Start-up and collectives per run", "",
              "Seconds from the launch command (sbatch / the per-node deepspeed launchers) as min / median / max over "
              "the ranks: the rank's process started, its imports were done (trainer entry), it joined the process "
              "group, DeepSpeed's expert/data groups existed, the engine was built, its first optimizer step ended. "
              "Every step is collective, so the first step ends together on all ranks, paced by the slowest one.", "",
              "| run | wall s | process start | imports done | process group | groups | engine | first step | "
              "new_group / rank | set-up collectives / rank | collectives per step (rank 0) | ckpt metadata B |",
              "|---|---:|---|---|---|---|---|---|---:|---:|---|---:|"]
        for run, f in self.figs:
            per = ", ".join(f"{k} {v}" for k, v in sorted(f.get("per_step", {}).items()))
            L.append(f"| {_what(run)} | {f['wall']:.0f} | {_span(f.get('process_start'))} | "
                     f"{_span(f.get('trainer_entry'))} | {_span(f.get('process_group'))} | {_span(f.get('groups'))} | "
                     f"{_span(f.get('engine'))} | {_span(f.get('first_step'))} | {f.get('new_group', '-')} | "
                     f"{f.get('setup_collectives', '-')} | {per or '-'} | {f.get('ckpt_meta_bytes', '-')} |")
        L += ["", "Launch commands (run from the run's directory; `--set` values as the script passes them):", ""]
        L += [f"- {run.name}: `{run.command}`" for run, _ in self.figs if run.command]
        biggest = max((f for _, f in self.figs), key=lambda f: f.get("ranks", 0), default=None)
        if biggest and biggest.get("first_steps"):
            fs = biggest["first_steps"]
            L += ["", f"First step per rank at the largest world (s from launch): "
                  + ", ".join(f"r{r} {t:.1f}" for r, t in sorted(fs.items(), key=lambda x: int(x[0])))]
        L += ["", "## What grows with the world size", ""]
        # the same layout (launcher, EP, ZeRO, dispatcher) at the most world sizes: only the world changes
        series: dict[tuple, dict] = {}
        for run, f in self.figs:
            if run.name.startswith(run.launcher):  # the layout runs (not the resume legs)
                series.setdefault((run.launcher, run.ep, run.zero, run.dispatcher), {}).setdefault(run.world, f)
        key, by_world = max(series.items(), key=lambda kv: len(kv[1]), default=(None, {}))
        rows = growth(by_world)
        if rows:
            L += [f"Layout {key[0]} EP{key[1]} ZeRO-{key[2]} {key[3]} at world {', '.join(map(str, sorted(by_world)))}. "
                  "Exponent k of value ~ world^k between the smallest and the largest world. Counts "
                  "are exact; on 2 shared cores every time grows about linearly by itself (the ranks share the "
                  "cores), so only k well above 1 means more work per rank as the world grows.", "",
                  "| quantity | values | k | faster than linear |", "|---|---|---:|---|"]
            L += [f"| {label} | {vals} | {k} | {verdict} |" for label, vals, k, verdict in rows]
        else:
            L.append("One world size only: no growth to measure (run the full rehearsal).")
        return "\n".join(L) + "\n"

    def write(self) -> None:
        text = self.markdown()
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w") as f:
                f.write(text)

    def print(self) -> None:
        print(self.markdown())
