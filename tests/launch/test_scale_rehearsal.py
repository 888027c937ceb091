"""benchmarks/scale_rehearsal.py: its bad-input lines and the per-rank records it reads
(``MOM_DIST_RANK_STATS``, one process) in the default suite; its quick mode end to end (mark
``cluster``): world 8 as 4 SLURM nodes x 2 ranks on this host - losses
equal to one process, all-to-all bytes and model-state memory equal to the planner's, an
elastic resume 8 -> 2 -> 1 equal to the uninterrupted run, a SIGKILLed rank named within 60 s.
Every row of its report must say PASS; the rows come from the runs, not from the script.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from mom_dist.config import load_config
from mom_dist.plan.memory import param_state_bytes
from mom_dist.plan.model_size import param_counts
from tests.dist_utils import ROOT
from tests.launch.launch_utils import BIN, clean_env, run, train_args

SCRIPT = os.path.join(ROOT, "benchmarks", "scale_rehearsal.py")


def rehearse(tmp_path, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=str(tmp_path), env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args,line", [
    (["--layouts", "slurm:w32:ep8"], "unknown layout 'slurm:w32:ep8': write LAUNCHER:wWORLD:epEP:zZERO[:capacity]"),
    (["--layouts", "mpi:w32:ep8:z1"], "unknown layout 'mpi:w32:ep8:z1'"),
    (["--layouts", "slurm:w18:ep2:z1"], "world 18 does not split over 4 nodes; use a multiple of 4"),
    (["--layouts", "slurm:w32:ep32:z1"], "EP 32 must divide the world (32) and the 16 modules per pool"),
    (["--quick", "--steps", "2"], "--steps 2: the resume needs at least 3 steps"),
])
def test_bad_input_is_one_line(tmp_path, args, line):
    p = rehearse(tmp_path, *args)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("scale_rehearsal.py: error: ") and line in p.stderr, \
        p.stderr
    assert "Traceback" not in p.stderr and not os.listdir(tmp_path)  # nothing started, nothing written


def test_rank_stats_record_one_process(tmp_path):
    """With MOM_DIST_RANK_STATS each rank records its start-up marks in order, the collectives it
    called (counted through torch.distributed) and the bytes it holds (the planner's, exactly for
    one process); without it nothing is written."""
    out, stats = tmp_path / "out", tmp_path / "stats"
    extra = ["parallel.ep_size=1", "train.save_interval=3"]
    run([os.path.join(BIN, "mom-train"), *train_args(out, *extra)], clean_env(MOM_DIST_RANK_STATS=str(stats)))
    rec = json.loads((stats / "rank0.json").read_text())
    order = ["process_start", "trainer_entry", "process_group", "groups", "engine", "checkpoint_load", "step_1",
             "step_2", "step_3", "save_start_3", "save_end_3", "end"]
    marks = rec["marks"]
    assert [marks[k] for k in order] == sorted(marks[k] for k in order), marks
    assert rec["steps"] == 3 and rec["world"] == 1 and rec["pid"] > 0 and rec["peak_rss"] > 2 ** 20
    assert rec["collectives"]["groups"].get("new_group", 0) >= 1 and rec["total"]["all_reduce"] > 0, rec["total"]
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [x for x in train_args(out, *extra)[2:]
                                                                   if x != "--set"])
    want = param_state_bytes(param_counts(cfg.model), 1, cfg.parallel.zero_stage, 1, cfg.train.precision)
    held = rec["held"]
    for c in ("params", "master", "states"):
        got = held.get(f"{c}_module", 0) + held.get(f"{c}_other", 0)
        assert abs(got - want[c]) <= 2e-3 * want[c] + 4096, (c, got, want)
    run([os.path.join(BIN, "mom-train"), *train_args(tmp_path / "out2", *extra)], clean_env())
    assert sorted(os.listdir(tmp_path)) == ["out", "out2", "stats"]


@pytest.mark.cluster
def test_quick_rehearsal_passes_every_row(tmp_path):
    results = tmp_path / "rehearsal.md"
    p = rehearse(tmp_path, "--quick", "--results", str(results), "--work", str(tmp_path / "work"), timeout=1800)
    if p.returncode != 0 and ("SLURM cannot start here" in p.stderr or "needs root" in p.stderr):
        pytest.skip(p.stderr.strip().splitlines()[-1])
    text = results.read_text() if results.exists() else ""
    rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \| (PASS|\*\*FAIL\*\*) \|", text, re.M)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-3000:]}"
    checks = {c.strip() for c, _, _ in rows}
    assert {"losses = 1 process", "a2a bytes = planner", "memory = planner", "resume", "killed rank"} <= checks, text
    assert rows and all(r == "PASS" for _, _, r in rows), text
    assert "4 x 2" in text and "8 (EP4 Z2) -> 2 (EP2 Z1) -> 1" in text, text
    assert re.search(r"named \d+\.\d s after the kill: `srun: error: \S+: task 5: Killed`", text), text
    # the launches were our own launcher, from outside the repository
    assert "launchers/slurm.sbatch" in text and f"python benchmarks/scale_rehearsal.py --quick" in text
